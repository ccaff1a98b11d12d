"""Cache layout and failure messages, plus a smoke test on the real assets.

The smoke tests only read the cache: they skip unless an earlier
``smollm2_path()`` / ``bigbench_task(...)`` call has filled it, and never
download anything.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moa_fx.eval import assets
from moa_fx.errors import AssetError

needs_smollm2 = pytest.mark.skipif(
    not assets.smollm2_cached(),
    reason="SmolLM2 not in the moa-fx cache; run moa_fx.eval.assets.smollm2_path() once",
)
needs_sports = pytest.mark.skipif(
    not assets.bigbench_task_cached("sports_understanding"),
    reason="sports_understanding not in the moa-fx cache; run moa_fx.eval.assets.bigbench_task(...) once",
)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MOA_FX_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert assets.cache_dir() == Path.home() / ".cache" / "moa-fx"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "moa-fx"
    monkeypatch.setenv("MOA_FX_CACHE", str(tmp_path / "explicit"))
    assert assets.cache_dir() == tmp_path / "explicit"


def test_failed_download_names_the_fix_and_leaves_no_files(monkeypatch, tmp_path):
    monkeypatch.setenv("MOA_FX_CACHE", str(tmp_path))

    def unreachable(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: no matching distribution")

    monkeypatch.setattr(assets.subprocess, "run", unreachable)
    with pytest.raises(AssetError, match="pip download bigbench==1.0.0.*place bigbench-1.0.0.tar.gz"):
        assets.bigbench_task("navigate")
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() or p.name.startswith(".tmp-")]
    assert leftovers == []


@pytest.mark.parametrize("name", ["", "../secrets", "a/./b"])
def test_task_names_must_stay_under_benchmark_tasks(name):
    with pytest.raises(AssetError, match="not a path under benchmark_tasks"):
        assets.bigbench_task_cached(name)


@needs_smollm2
def test_smollm2_has_the_documented_shape_and_sensible_weights():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.smollm2_path()
    config_text = (folder / "config.json").read_text()
    assert "quantization_config" not in config_text
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(model, "is_quantized", False) is False
    assert tokenizer.pad_token_id == 2 and len(tokenizer) == 49152

    def loss(text: str) -> float:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    sentence = "Water boils at 100 degrees Celsius at sea level."
    words = sentence.split()
    random.Random(0).shuffle(words)
    shuffled = " ".join(words)
    assert shuffled != sentence
    # ASSETS.md measured 3.24 against 8.11.
    assert loss(sentence) < 4.0 < loss(shuffled)


@needs_sports
def test_cached_task_loads():
    from moa_fx.eval.tasks import load_task

    task = assets.bigbench_task("sports_understanding")
    assert len(task["examples"]) == 1000
    assert "canary" in task
    examples = load_task("sports_understanding")
    assert {e.choices[e.answer] for e in examples} == {" plausible", " implausible"}


def test_missing_conversion_packages_name_the_extra(monkeypatch, tmp_path):
    monkeypatch.setenv("MOA_FX_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(AssetError, match=r'needs the package\(s\) gguf.*pip install "moa-fx\[eval\]"'):
        assets.smollm2_path()


def test_asset_available_reads_only_the_cache_unless_allowed(monkeypatch, tmp_path):
    monkeypatch.setenv("MOA_FX_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "registry_reachable", lambda timeout=30.0: True)
    assert not assets.asset_available(tasks=["navigate"])
    assert assets.asset_available(tasks=["navigate"], allow_fetch=True)
    task_file = tmp_path / "bigbench" / "navigate" / "task.json"
    task_file.parent.mkdir(parents=True)
    task_file.write_text("{}")
    assert assets.asset_available(model=False, tasks=["navigate"])
