"""The evaluation (moa_fx/eval/evaluate.py, moa_fx/eval/report.py, examples/evaluate.py): the smoke version end to
end on a tiny random model and synthetic task dicts (no assets, no network), resuming, the paired bootstrap, the
recipe sweep, and a short run on the real assets that skips itself when they are not cached."""

from __future__ import annotations

import json
import pathlib
import runpy
import sys

import pytest

from moa_fx.errors import InputError
from moa_fx.eval import evaluate as ev
from moa_fx.eval import report
from moa_fx.eval.assets import asset_available

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = dict(seeds=(0,), steps=2, eval_examples=8, curve_every=1, curve_examples=4, active_examples=4)


def _table(markdown: str) -> list[list[str]]:
    header = "| " + " | ".join(report.TABLE_COLUMNS) + " |"
    lines = markdown.splitlines()
    body = []
    for line in lines[lines.index(header) + 2:]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip("|").split("|")])
    return body


def _check_report(results: dict, out: pathlib.Path, methods, settings) -> None:
    body = _table((out / "results.md").read_text(encoding="utf-8"))
    # one zero-shot row and one row per method, per setting; every row has every column
    assert len(body) == len(settings) * (1 + len(methods))
    assert all(len(cells) == len(report.TABLE_COLUMNS) and all(cells) for cells in body), body
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert not saved["failures"]
    assert len(saved["runs"]) == len(methods) * len(settings) * len(results["config"]["seeds"])
    for run in saved["runs"]:
        assert 0.0 <= run["mean_accuracy"] <= 1.0
        assert run["trainable"] > 0 and run["step_time_median_s"] > 0 and run["peak_rss_mb"] > 0
        assert all(loss == loss for loss in run["losses"])  # no NaN
        for task, correct in run["correct"].items():  # what the bootstrap resamples
            assert len(correct) == saved["zero_shot"][task]["scored"]
            assert sum(correct) / len(correct) == pytest.approx(run["accuracy"][task])
        if run["method"] == "lora":
            assert run["active"] == {}
        else:  # every routed method reports a per-layer count between 0 and E
            active = run["active"]
            assert active["per_layer"] and 0.0 <= active["mean"] <= active["experts"]
        # the routers are measured before training too, with the same fields; τ only where a rule has one
        start, end = run["active_start"], run["active"]
        assert set(start) == set(end) and (start == {}) == (run["method"] == "lora")
        assert ("threshold_per_layer" in end) == (run["method"] in ("adamole", "sparse_moa")), run["method"]
        if end:
            assert 0.0 < end["gate_mean"] <= 1.0 and set(end["gate_per_layer"]) == set(end["per_layer"])
        if run["method"] == "sparse_moa":  # τ = τ_max·sigmoid(·) with τ_max 0.5 (METHODS.md)
            assert all(0.0 < t < 0.5 for t in start["threshold_per_layer"].values())
        if run["method"] == "mole_topk":
            assert run["active"]["mean"] == pytest.approx(2.0) == start["mean"]  # top-2
        if run["method"] == "soft_moa":  # dense: 5 LoRA + prompt + adapter
            assert run["active"]["mean"] == pytest.approx(7.0) == start["mean"]
    for row in report.summarize(saved):
        if row["method"] in ev.METHODS:
            assert row["chance"] == pytest.approx({"parity": 0.5, "parity+compare": 0.5, "hyperbaton": 0.5}[row["setting"]])


def test_quick_version_runs_every_method_end_to_end_and_writes_every_column(tmp_path):
    cfg = ev.quick_config(settings=("parity+compare",), **SMALL)  # generation: the next test (lora only)
    assert cfg.model == "tiny" and cfg.data == "synthetic" and not cfg.isolate
    results = ev.run_evaluation(cfg, tmp_path / "results.json", progress=False)
    paths = report.write_report(results, tmp_path)
    _check_report(results, tmp_path, ev.METHODS, cfg.settings)
    # the mixture of two tasks trains 2 × steps (each task gets its examples of a run alone), and its
    # learning curve has a single task's points: step 0 (zero-shot), then every 2 × curve_every steps
    assert all(run["steps"] == 4 and len(run["losses"]) == 4 for run in results["runs"])
    for row in report.summarize(results):
        if row["method"] in ev.METHODS:
            assert [p[0] for p in row["curve"]] == [0, 2, 4]
    chart = (tmp_path / "active_experts.txt").read_text(encoding="utf-8")
    assert chart.count("adamole ·") == len(cfg.settings) and chart.count("sparse_moa ·") == len(cfg.settings)
    charted = [m for m in report.CHART_METHODS if m in cfg.methods]
    assert chart.count("layer  2 │") == len(charted) * len(cfg.settings)
    markdown = paths["markdown"].read_text(encoding="utf-8")
    assert "Per-task accuracy, mixture `parity+compare`" in markdown and "The papers' claims" in markdown
    routers = {r["method"]: r["routers"] for r in report.summarize(results) if r.get("routers")}
    assert set(routers) == set(ev.METHODS) - {"lora"} and "threshold" in routers["sparse_moa"]
    assert "threshold" not in routers["mole_topk"] and "### Routers before and after training" in markdown
    pytest.importorskip("matplotlib")
    for key in ("curves", "png"):
        assert paths[key].read_bytes()[:4] == b"\x89PNG"


def test_measuring_the_routers_before_training_leaves_the_training_unchanged(tmp_path, monkeypatch):
    cfg = ev.quick_config(methods=("adamole",), settings=("parity",), **SMALL)  # dropout 0.05: draws numbers
    measured = ev.run_evaluation(cfg, tmp_path / "a.json", progress=False)["runs"][0]
    real = ev.active_experts_per_layer
    calls = []
    monkeypatch.setattr(ev, "active_experts_per_layer", lambda *a: calls.append(1) or (real(*a) if calls[1:] else {}))
    unmeasured = ev.run_evaluation(cfg, tmp_path / "b.json", progress=False)["runs"][0]
    assert len(calls) == 2 and unmeasured["active_start"] == {} and measured["active_start"]
    assert measured["losses"] == unmeasured["losses"] and measured["correct"] == unmeasured["correct"]


def test_mixture_budget_per_task_or_the_same_steps():
    cfg = ev.EvalConfig(steps=200)
    assert cfg.mixture_budget == "per_task"
    assert cfg.run_steps("hyperbaton") == 200 and cfg.run_steps("a+b+c") == 600
    assert cfg.run_warmup(600) == 60 and ev.EvalConfig(warmup=5).run_warmup(600) == 5
    same = ev.EvalConfig(steps=200, mixture_budget="same")
    assert same.run_steps("a+b+c") == 200
    with pytest.raises(InputError, match="mixture_budget = 'twice' must be 'per_task'"):
        ev.EvalConfig(mixture_budget="twice")


def test_a_stopped_evaluation_resumes_without_repeating_runs_and_refuses_other_settings(tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    cfg = ev.quick_config(methods=("lora",), settings=("parity",), **SMALL)
    first = ev.run_evaluation(cfg, out, progress=False)
    calls = []
    real = ev._train_and_score
    monkeypatch.setattr(ev, "_train_and_score", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    more = ev.quick_config(methods=("lora", "sparse_moa"), settings=("parity",), **SMALL)
    second = ev.run_evaluation(more, out, progress=False)
    assert [job["method"] for job in calls] == ["sparse_moa"]  # lora's run and the zero-shot scores are kept
    as_saved = json.loads(json.dumps(first))
    assert second["runs"][0] == as_saved["runs"][0] and second["zero_shot"] == as_saved["zero_shot"]
    saved = json.loads(out.read_text(encoding="utf-8"))["runs"]
    assert [ev.run_key(r) for r in saved] == [("lora", "parity", 0, 5e-3), ("sparse_moa", "parity", 0, 5e-3)]
    # each run records the libraries it ran under, so a folder resumed after an upgrade says it mixes them
    assert [r["versions"] for r in saved] == [ev.library_versions()] * 2
    saved[0]["versions"] = {"torch": "2.0.0", "transformers": "4.0.0"}
    del saved[1]["versions"]  # a run from before versions were recorded
    markdown = report.markdown_report({**second, "runs": saved})
    assert ("Library versions by run: torch 2.0.0, transformers 4.0.0: 1 run; "
            "not recorded (runs before per-run versions): 1 run.") in markdown
    with pytest.raises(InputError, match=r"other settings \(steps 2 → 3\)"):
        ev.run_evaluation(ev.quick_config(methods=("lora",), settings=("parity",), **{**SMALL, "steps": 3}), out)
    out.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(InputError, match="not an evaluation results file"):
        ev.run_evaluation(cfg, out)


def test_workers_run_jobs_at_once_in_fresh_processes_with_the_same_results(tmp_path):
    kw = dict(methods=("lora", "sparse_moa"), settings=("parity",), threads=1, **SMALL)
    sequential = ev.run_evaluation(ev.quick_config(**kw), tmp_path / "one.json", progress=False)
    parallel = ev.run_evaluation(ev.quick_config(workers=2, isolate=True, **kw), tmp_path / "two.json",
                                 progress=False)
    assert not parallel["failures"] and parallel["machine"]["workers"] == 2
    saved = json.loads((tmp_path / "two.json").read_text(encoding="utf-8"))
    assert sorted(ev.run_key(r) for r in saved["runs"]) == sorted(ev.run_key(r) for r in sequential["runs"])
    by_key = {ev.run_key(r): r for r in saved["runs"]}
    for run in sequential["runs"]:  # the same seeds in another process: the same training
        twin = by_key[ev.run_key(run)]
        assert twin["isolated"] and twin["losses"] == run["losses"] and twin["correct"] == run["correct"]
    assert {t: z["correct"] for t, z in saved["zero_shot"].items()} == \
        {t: z["correct"] for t, z in sequential["zero_shot"].items()}
    assert "2 runs ran at once" in report.markdown_report(saved)
    with pytest.raises(InputError, match="workers = 2 runs each job in its own process; it needs isolate"):
        ev.quick_config(workers=2, **kw)


def test_a_failing_run_is_recorded_and_tried_again_by_the_next_call(tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    cfg = ev.quick_config(methods=("lora", "mole_topk"), settings=("parity",), **SMALL)
    real = ev.budget_spec

    def broken(method):
        if method == "mole_topk":
            raise RuntimeError("boom")
        return real(method)

    monkeypatch.setattr(ev, "budget_spec", broken)
    results = ev.run_evaluation(cfg, out, progress=False)
    assert [r["method"] for r in results["runs"]] == ["lora"]
    assert results["failures"][0]["method"] == "mole_topk" and "boom" in results["failures"][0]["error"]
    monkeypatch.setattr(ev, "budget_spec", real)
    again = ev.run_evaluation(cfg, out, progress=False)
    assert [r["method"] for r in again["runs"]] == ["lora", "mole_topk"] and not again["failures"]


def test_paired_bootstrap_on_known_differences():
    same = {0: {"t": [1, 0, 1, 1]}, 1: {"t": [0, 1, 1, 0]}}
    test = report.paired_bootstrap(same, same, ["t"])
    assert test["delta"] == 0 and test["low"] == 0 == test["high"] and test["p"] == 1.0
    right = {s: {"t": [1] * 50} for s in (0, 1, 2)}
    wrong = {s: {"t": [0] * 50} for s in (0, 1, 2)}
    test = report.paired_bootstrap(right, wrong, ["t"])
    assert test["delta"] == 1.0 and test["p"] < 0.001 and test["seeds"] == 3
    # 10 of 100 examples better, on every seed: Δ = 0.1, its interval holds it and excludes 0
    base = [0] * 100
    better = [1] * 10 + [0] * 90
    test = report.paired_bootstrap({s: {"t": better} for s in (0, 1)}, {s: {"t": base} for s in (0, 1)}, ["t"])
    assert test["delta"] == pytest.approx(0.1) and 0 < test["low"] < 0.1 < test["high"] and test["p"] < 0.01
    # two tasks: the macro mean; zero-shot (key -1) stands for every seed; unpaired examples → None
    two = report.paired_bootstrap({0: {"a": [1, 1], "b": [0, 0]}}, {-1: {"a": [0, 0], "b": [0, 0]}}, ["a", "b"])
    assert two["delta"] == pytest.approx(0.5)
    assert report.paired_bootstrap({0: {"t": [1, 0]}}, {0: {"t": [1]}}, ["t"]) is None
    assert report.paired_bootstrap({0: {"t": [1]}}, {1: {"t": [1]}}, ["t"]) is None


def _fake_results(accuracies: dict[tuple[str, float], list[int]], settings=("a+b",)) -> dict:
    runs = []
    for (method, lr), correct in accuracies.items():
        for seed in (0, 1, 2):
            acc = sum(correct) / len(correct)
            runs.append({"method": method, "setting": settings[0], "seed": seed, "lr": lr, "kind": "mixture",
                         "accuracy": {"a": acc, "b": acc}, "correct": {"a": correct, "b": correct},
                         "mean_accuracy": acc, "trainable": 1, "step_time_median_s": 1.0, "peak_rss_mb": 1.0,
                         "active": {}, "curve": [], "loss_first": 1.0, "loss_last10": 0.5})
    zero = {t: {"accuracy": 0.5, "correct": [1, 0] * 20, "chance": 0.5, "scored": 40, "curve_accuracy": 0.5,
                "data": {"train": 1, "dropped_long_prompts": 0}} for t in ("a", "b")}
    return {"config": {"settings": list(settings), "methods": sorted({m for m, _ in accuracies}), "split": "val",
                       "isolate": False}, "runs": runs, "zero_shot": zero}


def test_best_lrs_and_the_claims_follow_the_numbers():
    good, bad = [1] * 36 + [0] * 4, [1] * 20 + [0] * 20
    results = _fake_results({("lora", 1e-3): bad, ("lora", 2e-3): good, ("soft_moa", 1e-3): good,
                             ("soft_moa", 2e-3): good, ("sparse_moa", 1e-3): bad, ("mole_topk", 1e-3): good})
    assert report.best_lrs(results) == {"lora": 2e-3, "soft_moa": 1e-3, "sparse_moa": 1e-3, "mole_topk": 1e-3}
    verdicts = {c["claim"]: c for c in report.claims(results)}
    # against lora's best rate: equal, so not supported; sparse is significantly worse than soft
    assert verdicts["MoA (soft) beats LoRA on the multi-task mixture"]["verdict"].startswith("not supported")
    assert verdicts["Sparse MoA beats LoRA on the multi-task mixture"]["verdict"].startswith("contradicted")
    assert verdicts["Sparse MoA costs no accuracy against soft MoA (mixture)"]["verdict"] == \
        "not supported (significantly worse)"
    assert verdicts["AdaMoLE beats LoRA (single tasks)"]["verdict"] == "not measured"
    rows = {(r["method"], r["lr"]): r for r in report.summarize(results)}
    assert rows[("soft_moa", 1e-3)]["vs_zero_shot"]["delta"] == pytest.approx(0.4)
    assert rows[("lora", 2e-3)]["vs_lora"] is None and rows[("sparse_moa", 1e-3)]["vs_lora"]["delta"] < 0


def test_combined_evaluations_pool_the_claims_over_their_settings(tmp_path, monkeypatch, capsys):
    """Two evaluations on different tasks, combined: one report whose single-task claims pool both
    (the pooled Δ is the mean of the two tasks'); refused when run settings differ, a run is in both,
    or a task's zero-shot differs; the CLI writes the report in a folder of its own."""
    lora = [1, 0] * 20
    a = _fake_results({("lora", 2e-3): lora, ("adamole", 2e-3): [1] * 24 + [1, 0] * 8}, settings=("a",))
    b = _fake_results({("lora", 2e-3): lora, ("adamole", 2e-3): [1] * 32 + [1, 0] * 4}, settings=("b",))
    claim = "AdaMoLE beats LoRA (single tasks)"
    alone = [next(c for c in report.claims(r) if c["claim"] == claim)["test"]["delta"] for r in (a, b)]
    assert alone == [pytest.approx(0.3), pytest.approx(0.4)]
    combined = report.combine([("A", a), ("B", b)])
    assert combined["config"]["settings"] == ["a", "b"] and len(combined["runs"]) == 12
    pooled = next(c for c in report.claims(combined) if c["claim"] == claim)["test"]
    assert pooled["delta"] == pytest.approx(0.35) and pooled["seeds"] == 3
    other = {**b, "config": {**b["config"], "steps": 100}}
    with pytest.raises(InputError, match="steps None in A, 100 in B"):
        report.combine([("A", a), ("B", other)])
    with pytest.raises(InputError, match="in both A and A2"):
        report.combine([("A", a), ("A2", a)])
    bf16 = {**b, "config": {**b["config"], "precision": "bf16"}}
    with pytest.raises(InputError, match="precision None in A, 'bf16' in B"):
        report.combine([("A", a), ("B", bf16)])
    two_at_once = {**b, "config": {**b["config"], "workers": 2}}
    caption = report.markdown_report(report.combine([("A", a), ("B", two_at_once)]))
    assert "by folder: A: 1, B: 2" in caption
    shifted = {**b, "zero_shot": {**b["zero_shot"], "a": {**b["zero_shot"]["a"], "correct": [0, 1] * 20}}}
    with pytest.raises(InputError, match="scored 'a' zero-shot differently"):
        report.combine([("A", a), ("B", shifted)])

    script = str(ROOT / "examples" / "evaluate.py")
    for name, results in (("A", a), ("B", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results), encoding="utf-8")

    def run(*args):
        monkeypatch.setattr(sys, "argv", [script, *args])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(script, run_name="__main__")
        return exit_info.value.code

    both = f"{tmp_path / 'A'},{tmp_path / 'B'}"
    assert run("--combine", both, "--out", str(tmp_path / "all")) == 0
    assert len(json.loads((tmp_path / "all" / "combined.json").read_text(encoding="utf-8"))["runs"]) == 12
    assert "| b | adamole |" in (tmp_path / "all" / "results.md").read_text(encoding="utf-8")
    capsys.readouterr()
    assert run("--combine", both, "--out", str(tmp_path / "A")) == 2
    assert "holds an evaluation" in capsys.readouterr().err
    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "results.json").write_text("{}", encoding="utf-8")
    assert run("--combine", both, "--out", str(tmp_path / "C")) == 2  # another evaluation's folder
    assert run("--combine", both) == 2  # no --out: not the default evaluation folder
    assert "--combine needs --out" in capsys.readouterr().err
    assert not (tmp_path / "A" / "results.md").exists() and not (tmp_path / "C" / "results.md").exists()
    (tmp_path / "D").mkdir()
    (tmp_path / "D" / "results.json").write_text(json.dumps({"config": a["config"], "runs": [{"seed": 0}]}), encoding="utf-8")
    capsys.readouterr()
    assert run("--combine", f"{both},{tmp_path / 'D'}", "--out", str(tmp_path / "all2")) == 2
    assert "is malformed" in capsys.readouterr().err


def test_cli_sweep_writes_recipes_then_the_evaluation_reads_them(tmp_path, monkeypatch, capsys):
    script = str(ROOT / "examples" / "evaluate.py")

    def run(*args):
        monkeypatch.setattr(sys, "argv", [script, "--quick", "--seeds", "0", "--steps", "2", "--eval-examples", "8",
                                          "--curve-every", "0", "--tasks", "parity", *args])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(script, run_name="__main__")
        return exit_info.value.code

    sweep = tmp_path / "sweep"
    assert run("--methods", "lora", "--sweep-lrs", "1e-3,5e-3", "--out", str(sweep)) == 0
    results = json.loads((sweep / "results.json").read_text(encoding="utf-8"))
    assert results["config"]["split"] == "val" and sorted(r["lr"] for r in results["runs"]) == [1e-3, 5e-3]
    recipes = json.loads((sweep / "recipes.json").read_text(encoding="utf-8"))
    assert set(recipes) == {"lora"} and recipes["lora"] in (1e-3, 5e-3)
    final = tmp_path / "final"
    assert run("--methods", "lora", "--recipes", str(sweep / "recipes.json"), "--out", str(final)) == 0
    (only,) = json.loads((final / "results.json").read_text(encoding="utf-8"))["runs"]
    assert only["lr"] == recipes["lora"]
    assert run("--methods", "lora", "--recipes", str(sweep / "recipes.json"), "--out", str(final), "--report-only") == 0
    assert "| parity | lora |" in capsys.readouterr().out
    assert run("--recipes", "lora:2e-3", "--out", str(final)) == 2  # argparse's usage error
    assert "method=lr pairs" in capsys.readouterr().err
    assert run("--out", str(tmp_path / "none"), "--report-only") == 2


def test_a_generation_task_is_scored_by_exact_match_in_the_harness(tmp_path):
    """A mixture of a multiple-choice task and a free-text one: zero-shot by the base model's generate,
    after training by the MoAModel's; no first-choice share for the free-text task, chance 0."""
    cfg = ev.quick_config(methods=("lora",), settings=("parity+successor",), **{**SMALL, "curve_every": 0})
    results = ev.run_evaluation(cfg, pathlib.Path(tmp_path) / "results.json", progress=False)
    zero = results["zero_shot"]
    assert {t: z["chance"] for t, z in zero.items()} == {"parity": 0.5, "successor": 0.0}
    (run,) = results["runs"]
    assert set(run["accuracy"]) == {"parity", "successor"} and set(run["first_choice_share"]) == {"parity"}
    assert all(0.0 <= a <= 1.0 for a in list(run["accuracy"].values()) + [z["accuracy"] for z in zero.values()])
    assert "exact match" in report.markdown_report(results)


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
    hydra = ev.budget_spec("hydralora")
    assert hydra.experts[0].ranks == (8,) * 4 and hydra.experts[0].alpha == 64 and hydra.experts[0].share_a
    assert ev.budget_spec("sparse_moa").router.threshold.rule == "moa"
    tau = ev.budget_spec("sparse_moa_tau")
    assert tau.router.threshold.rule == "adamole" and tau.name == "sparse_moa_tau" and not tau.router.renormalizes
    # the rule's math and τ's gradient: tests/test_methods/test_moa.py ("sparse_moa_adamole_rule", against the reference)
    assert tau.experts == ev.budget_spec("sparse_moa").experts and "sparse_moa_tau" not in ev.EvalConfig().methods
    assert set(ev.BUDGET_CHANGES) == set(ev.METHODS + ev.VARIANTS)
    for bad, match in ((dict(methods=("nope",)), "unknown method"), (dict(lrs={"nope": 1e-3}), "unknown method"),
                       (dict(max_grad_norm=-1), "max_grad_norm = -1 must be >= 0"), (dict(split="train"), "split"),
                       (dict(sweep_lrs=(0,)), "learning rate must be > 0"), (dict(curve_every=-1), "curve_every"),
                       (dict(settings=("a+",)), None), (dict(settings=("+",)), "empty task setting"),
                       (dict(device="tpu"), "device")):
        if match is None:
            ev.EvalConfig(**bad)  # a trailing + is tolerated: the setting is "a"
            continue
        with pytest.raises(InputError, match=match):
            ev.EvalConfig(**bad)
    assert ev.parse_setting("a+b") == ["a", "b"] and ev.setting_kind("a") == "single"
    cfg = ev.EvalConfig(methods=("lora", "adamole"), settings=("x",), seeds=(0, 1), lrs={"lora": 1e-3},
                        sweep_lrs=())
    assert [(j["method"], j["seed"], j["lr"]) for j in cfg.jobs()] == [
        ("lora", 0, 1e-3), ("adamole", 0, 2e-3), ("lora", 1, 1e-3), ("adamole", 1, 2e-3)]
    assert len(ev.EvalConfig(methods=("lora",), settings=("x",), seeds=(0,), sweep_lrs=(1e-3, 2e-3)).jobs()) == 2


@pytest.mark.slow
@pytest.mark.skipif(not asset_available(tasks=["hyperbaton"]),
                    reason="SmolLM2 / BIG-bench assets are not cached (see ASSETS.md)")
def test_real_assets_smoke(tmp_path):
    """SmolLM2-135M, one method, 6 steps, 32 held-out examples: the pipeline works on the real model
    (about 1 minute on 2 free cores)."""
    cfg = ev.EvalConfig(methods=("sparse_moa",), settings=("hyperbaton",), seeds=(0,), steps=6, batch_size=4,
                        eval_examples=32, curve_every=3, curve_examples=8, active_examples=8, isolate=False, threads=1)
    results = ev.run_evaluation(cfg, tmp_path / "results.json", progress=False)
    report.write_report(results, tmp_path)
    _check_report(results, tmp_path, ("sparse_moa",), ("hyperbaton",))
    (run,) = results["runs"]
    assert run["trainable"] == 2_851_890  # the preset on SmolLM2's 30 layers
    assert sorted(int(k) for k in run["active"]["per_layer"]) == list(range(30))
    assert results["zero_shot"]["hyperbaton"]["scored"] == 32


def test_a_run_cut_off_resumes_at_its_last_saved_step_with_the_same_result(tmp_path, monkeypatch):
    cfg = ev.quick_config(methods=("adamole",), settings=("parity",), **{**SMALL, "steps": 5, "save_every": 2})
    for d in ("whole", "cut", "again"):
        (tmp_path / d).mkdir()
    whole = ev.run_evaluation(cfg, tmp_path / "whole" / "results.json", progress=False)["runs"][0]
    out = tmp_path / "cut" / "results.json"
    real_save, saved_steps = ev.save_partial, []

    def save_then_die(path, key, step, *args):
        real_save(path, key, step, *args)
        saved_steps.append(step)
        if step == 4:
            raise KeyboardInterrupt  # the session's end, after the state at step 4 was written

    monkeypatch.setattr(ev, "save_partial", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        ev.run_evaluation(cfg, out, progress=False)
    assert saved_steps == [2, 4]
    state = ev.partial_path(out, whole)
    assert state.exists()
    fits = []
    real_fit = ev.fit
    monkeypatch.setattr(ev, "fit", lambda *a, **k: fits.append((k["start"], k["stop"])) or real_fit(*a, **k))
    resumed = ev.run_evaluation(cfg, out, progress=False)["runs"][0]
    assert fits == [(4, 5)]  # only the step after the saved one
    for field in ("losses", "accuracy", "correct", "active", "active_start", "loss_last10"):
        assert resumed[field] == whole[field], field
    assert not state.exists()  # recorded: its state is removed
    # a state saved under other settings is not resumed
    monkeypatch.setattr(ev, "save_partial", save_then_die)
    other = ev.quick_config(methods=("adamole",), settings=("parity",), **{**SMALL, "steps": 5, "save_every": 2})
    with pytest.raises(KeyboardInterrupt):
        ev.run_evaluation(other, tmp_path / "again" / "results.json", progress=False)
    torch_state = ev.partial_path(tmp_path / "again" / "results.json", whole)
    assert ev.load_partial(torch_state, {"other": 1}, None, None, lambda m: fits.append(m)) == (0, {})
    assert "saved under other settings" in fits[-1]
