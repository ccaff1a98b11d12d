"""The evaluation report (moa_fx/eval/evaluate.py, examples/evaluate.py): the smoke version end to end on a
tiny random model and synthetic task dicts (no assets, no network), and a short run on the real
assets that skips itself when they are not cached."""

from __future__ import annotations

import json
import pathlib
import runpy
import sys

import pytest

from moa_fx.eval import evaluate as ev
from moa_fx.eval.assets import asset_available

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _check_report(results: dict, out: pathlib.Path, methods, settings) -> None:
    markdown = (out / "results.md").read_text(encoding="utf-8")
    header = "| " + " | ".join(ev.TABLE_COLUMNS) + " |"
    assert header in markdown
    lines = markdown.splitlines()
    start = lines.index(header)
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append(line)
    # one zero-shot row and one row per method, per setting; every row has every column
    assert len(body) == len(settings) * (1 + len(methods))
    for line in body:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(ev.TABLE_COLUMNS), line
        assert all(cells), line
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert not saved["failures"]
    assert len(saved["runs"]) == len(methods) * len(settings) * len(results["config"]["seeds"])
    for run in saved["runs"]:
        assert 0.0 <= run["mean_accuracy"] <= 1.0
        assert run["trainable"] > 0 and run["step_time_median_s"] > 0 and run["peak_rss_mb"] > 0
        assert all(loss == loss for loss in run["losses"])  # no NaN
        if run["method"] == "lora":
            assert run["active"] == {}
        else:  # every routed method reports a per-layer count between 0 and E
            active = run["active"]
            assert active["per_layer"] and 0.0 <= active["mean"] <= active["experts"]
        if run["method"] == "mole_topk":
            assert run["active"]["mean"] == pytest.approx(2.0)  # top-2
        if run["method"] == "soft_moa":
            assert run["active"]["mean"] == pytest.approx(7.0)  # dense: 5 LoRA + prompt + adapter
    for row in saved["summary"]:
        if row["method"] in ev.METHODS:
            assert row["chance"] == pytest.approx(0.5)


def test_quick_version_runs_end_to_end_and_writes_every_column(tmp_path):
    cfg = ev.quick_config(seeds=(0,), steps=2, eval_examples=12, active_examples=8)
    assert cfg.model == "tiny" and cfg.data == "synthetic" and not cfg.isolate
    results = ev.run_evaluation(cfg)
    paths = ev.write_report(results, tmp_path)
    assert paths["json"].exists() and paths["markdown"].exists()
    _check_report(results, tmp_path, ev.METHODS, cfg.settings)
    # the per-layer chart covers adamole and sparse_moa, one bar per layer of the tiny model (3)
    chart = (tmp_path / "active_experts.txt").read_text(encoding="utf-8")
    assert chart.count("adamole ·") == len(cfg.settings) and chart.count("sparse_moa ·") == len(cfg.settings)
    assert chart.count("layer  2 │") == 2 * len(cfg.settings)
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "Per-task accuracy, mixture `parity+compare`" in markdown and "Parameter budgets" in markdown


def test_cli_quick_and_report_from(tmp_path, monkeypatch, capsys):
    script = str(ROOT / "examples" / "evaluate.py")
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [script, "--quick", "--methods", "lora,sparse_moa", "--tasks", "parity+compare",
                                      "--seeds", "0,1", "--steps", "2", "--eval-examples", "8", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name="__main__")
    assert exit_info.value.code == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["config"]["seeds"] == [0, 1] and results["command"].endswith(f"--out {out}")
    _check_report(results, out, ("lora", "sparse_moa"), ("parity+compare",))
    assert (out / "results.partial.json").exists()
    # the report can be rebuilt from the partial file of a stopped run
    again = tmp_path / "again"
    monkeypatch.setattr(sys, "argv", [script, "--report-from", str(out / "results.partial.json"), "--out", str(again)])
    with pytest.raises(SystemExit):
        runpy.run_path(script, run_name="__main__")
    table_rows = [line for line in (again / "results.md").read_text(encoding="utf-8").splitlines()
                  if line.startswith("| parity+compare |")]
    assert len(table_rows) == 3
    assert "sparse_moa · parity+compare" in capsys.readouterr().out


def test_a_generation_task_is_scored_by_exact_match_in_the_harness():
    """A mixture of a multiple-choice task and a free-text one: zero-shot by the base model's generate,
    after training by the MoAModel's; no first-choice share for the free-text task, chance 0."""
    cfg = ev.quick_config(methods=("lora",), settings=("parity+successor",), seeds=(0,), steps=2,
                          eval_examples=8, active_examples=4)
    results = ev.run_evaluation(cfg)
    zero = results["zero_shot"]
    assert zero["chance"] == {"parity": 0.5, "successor": 0.0}
    (run,) = results["runs"]
    assert set(run["accuracy"]) == {"parity", "successor"} and set(run["first_choice_share"]) == {"parity"}
    assert all(0.0 <= a <= 1.0 for a in list(run["accuracy"].values()) + list(zero["accuracy"].values()))
    assert "exact match" in ev.markdown_report(results)


def test_generated_answers_of_a_moa_model():
    """With B = 0 the MoAModel's generate answers as the base model's; with non-zero adapters the
    answers change and still do not depend on the batch (left padding is masked in the graph)."""
    import torch

    from moa_fx import transform
    from moa_fx.eval import tasks as T

    base, tokenizer = ev.load_model("tiny")
    examples = T.examples_from_task_dict(ev.synthetic_task_dicts()["successor"], name="successor")[:10]
    before = T.generate_answers(base, tokenizer, examples, batch_size=4)
    moa = transform(base, ev.budget_spec("lora"))
    assert T.generate_answers(moa, tokenizer, examples, batch_size=4) == before
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in moa.named_parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.5)
    after = T.generate_answers(moa, tokenizer, examples, batch_size=4)
    assert after != before
    assert T.generate_answers(moa, tokenizer, examples, batch_size=1) == after


def test_the_compiler_and_the_cli_do_not_import_the_harness():
    """moa_fx.eval sits behind the [eval] extra: importing the package, the CLI or the trainer loads none of it."""
    import subprocess

    code = ("import sys, moa_fx, moa_fx.cli, moa_fx.train; "
            "print(sorted(m for m in sys.modules if m.startswith('moa_fx.eval')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_budget_specs_and_config_errors():
    assert ev.budget_spec("lora").experts[0].r == 16
    topk = ev.budget_spec("mole_topk")
    assert topk.experts[0].ranks == (4,) * 4 and topk.router.top_k == 2
    ada = ev.budget_spec("adamole")
    assert ada.experts[0].ranks == (4,) * 4 and ada.router.threshold.rule == "adamole"
    assert ev.budget_spec("sparse_moa").router.threshold.rule == "moa"
    assert set(ev.BUDGET_CHANGES) == set(ev.METHODS)
    with pytest.raises(Exception, match="unknown method"):
        ev.EvalConfig(methods=("nope",))
    with pytest.raises(Exception, match="max_grad_norm = -1 must be >= 0"):
        ev.EvalConfig(max_grad_norm=-1)
    assert ev.parse_setting("a+b") == ["a", "b"] and ev.setting_kind("a") == "single"


@pytest.mark.slow
@pytest.mark.skipif(not asset_available(tasks=["sports_understanding"]),
                    reason="SmolLM2 / BIG-bench assets are not cached (see ASSETS.md)")
def test_real_assets_smoke(tmp_path):
    """SmolLM2-135M, one method, 6 steps, 32 held-out examples: the pipeline works on the real model
    (about 1 minute on 2 free cores; measured 3.7 min for 10 steps / 40 examples on a shared machine)."""
    cfg = ev.EvalConfig(methods=("sparse_moa",), settings=("sports_understanding",), seeds=(0,), steps=6,
                        batch_size=4, eval_examples=32, active_examples=8, isolate=False, threads=1)
    results = ev.run_evaluation(cfg)
    ev.write_report(results, tmp_path)
    _check_report(results, tmp_path, ("sparse_moa",), ("sports_understanding",))
    (run,) = results["runs"]
    assert run["trainable"] == 2_851_890  # the preset on SmolLM2's 30 layers
    assert sorted(int(k) for k in run["active"]["per_layer"]) == list(range(30))
    assert results["zero_shot"]["test_sizes"]["sports_understanding"] == 32
