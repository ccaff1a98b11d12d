"""The evaluation's report, computed from a results dict (:func:`moa_fx.eval.evaluate.run_evaluation`).

Map:

- :func:`summarize` -- one row per (setting, method, lr): accuracy mean ± std over seeds, Δ against
  zero-shot and against ``lora`` with a paired bootstrap (:func:`paired_bootstrap`), step time, peak
  memory, active experts per layer; plus a zero-shot row per setting.
- :func:`best_lrs` -- each method's learning rate with the best mean accuracy in a sweep.
- :func:`combine` -- one results dict from several evaluations made under the same run settings, so
  that one report pools the claims over all their settings.
- :func:`claims` -- the papers' claims, each supported or not by the numbers.
- :func:`markdown_report`, :func:`terminal_chart`, :func:`write_report` -- the tables, the text chart
  of active experts per layer, and the files (JSON, Markdown, and PNGs via matplotlib when installed:
  accuracy against step per method, active experts per layer).

The bootstrap resamples seeds and scored examples together (B = 2000, a fixed generator): both arms
of a comparison use the same drawn seeds and examples (runs with one seed share their data order and
initialisation across methods, and every method scores the same examples), so the difference is
paired. ``p`` is two-sided: twice the smaller share of resampled differences on either side of 0.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
from collections.abc import Sequence
from typing import Any

import torch

from moa_fx.errors import InputError
from moa_fx.eval.evaluate import BUDGET_CHANGES, EvalConfig, parse_setting
from moa_fx.fileio import atomic_write_json, atomic_write_text

__all__ = ["TABLE_COLUMNS", "summarize", "paired_bootstrap", "best_lrs", "claims", "markdown_report",
           "terminal_chart", "write_report"]

ZERO_SHOT = "zero-shot (base model)"
REFERENCE = "lora"
RESAMPLES = 2000
TABLE_COLUMNS = ("setting", "method", "lr", "accuracy (mean ± std)", "Δ vs zero-shot [95% CI] p",
                 "Δ vs lora [95% CI] p", "trainable params", "step time (s)", "peak RSS (MB)", "active experts / token")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def paired_bootstrap(arm: dict[int, dict[str, list[int]]], other: dict[int, dict[str, list[int]]],
                     tasks: Sequence[str], *, resamples: int = RESAMPLES, seed: int = 0) -> dict[str, float] | None:
    """Δ = macro mean over ``tasks`` of (accuracy of ``arm`` − accuracy of ``other``), with a 95%
    bootstrap interval and a two-sided p over seeds and examples resampled together.

    ``arm`` / ``other``: seed → task → 0/1 per scored example (the same examples in the same order on
    both sides). Seeds present on one side only are left out; ``other`` may hold the key ``-1`` alone
    (zero-shot: one result for every seed). None when no seed is shared or the examples differ.
    """
    if set(other) == {-1}:
        other = {s: other[-1] for s in arm}
    seeds = sorted(set(arm) & set(other))
    if not seeds:
        return None
    gen = torch.Generator().manual_seed(seed)
    k = len(seeds)
    seed_counts = torch.zeros(resamples, k).scatter_add_(1, torch.randint(k, (resamples, k), generator=gen),
                                                        torch.ones(resamples, k))
    deltas, total = torch.zeros(resamples), 0.0
    for task in tasks:
        a = torch.tensor([arm[s][task] for s in seeds], dtype=torch.float64)
        b = torch.tensor([other[s][task] for s in seeds], dtype=torch.float64)
        if a.shape != b.shape or a.numel() == 0:
            return None
        d = a - b  # (seeds, examples)
        n = d.shape[1]
        example_counts = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
            1, torch.randint(n, (resamples, n), generator=gen), torch.ones(resamples, n, dtype=torch.float64))
        deltas += ((seed_counts.double() @ d) * example_counts).sum(1).float() / (k * n)
        total += float(d.mean())
    deltas /= len(tasks)
    low, high = torch.quantile(deltas, torch.tensor([0.025, 0.975])).tolist()
    p = min(1.0, 2 * min(float((deltas <= 0).double().mean()), float((deltas >= 0).double().mean())))
    return {"delta": total / len(tasks), "low": low, "high": high, "p": p, "seeds": k}


def _correct_by_seed(runs: Sequence[dict[str, Any]]) -> dict[int, dict[str, list[int]]]:
    return {int(r["seed"]): r["correct"] for r in runs if r.get("correct")}


def _zero_shot_correct(results: dict[str, Any], names: Sequence[str]) -> dict[int, dict[str, list[int]]] | None:
    zero = results.get("zero_shot", {})
    if not all(n in zero and "correct" in zero[n] for n in names):
        return None
    return {-1: {n: zero[n]["correct"] for n in names}}


def _groups(results: dict[str, Any]) -> list[tuple[str, str, float, list[dict[str, Any]]]]:
    """(setting, method, lr, runs) in the order of the configuration."""
    cfg = results["config"]
    out = []
    for setting in cfg["settings"]:
        for method in cfg["methods"]:
            runs = [r for r in results["runs"] if r["method"] == method and r["setting"] == setting]
            for lr in sorted({float(r["lr"]) for r in runs}):
                out.append((setting, method, lr, [r for r in runs if float(r["lr"]) == lr]))
    return out


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (setting, method, lr) aggregated over seeds, plus a zero-shot row per setting."""
    cfg = results["config"]
    zero = results.get("zero_shot", {})
    rows: list[dict[str, Any]] = []
    groups = _groups(results)
    for setting in cfg["settings"]:
        names = parse_setting(setting)
        have_zero = all(n in zero for n in names)
        zero_acc = sum(zero[n]["accuracy"] for n in names) / len(names) if have_zero else None
        chance = sum(zero[n]["chance"] for n in names) / len(names) if have_zero else None
        rows.append({"setting": setting, "method": ZERO_SHOT, "lr": None, "seeds": 0, "accuracy_mean": zero_acc,
                     "accuracy_std": None, "per_task": {n: (zero[n]["accuracy"], None) for n in names if n in zero},
                     "chance": chance, "zero_shot": zero_acc, "vs_zero_shot": None, "vs_lora": None, "trainable": 0,
                     "step_time_s": None, "peak_rss_mb": None, "active_mean": None, "experts": None,
                     "active_per_layer": None, "curve": None})
        zero_correct = _zero_shot_correct(results, names)
        reference = [g for g in groups if g[0] == setting and g[1] == REFERENCE]
        for _, method, lr, runs in (g for g in groups if g[0] == setting):
            mean, std = _mean_std([r["mean_accuracy"] for r in runs])
            active = [r["active"] for r in runs if r.get("active")]
            per_layer = None
            if active:
                per_layer = {k: sum(a["per_layer"][k] for a in active) / len(active) for k in active[0]["per_layer"]}
            vs_lora = None
            if reference and method != REFERENCE:  # against the reference's best lr in this setting
                ref_runs = max((g[3] for g in reference), key=lambda rs: _mean_std([r["mean_accuracy"] for r in rs])[0])
                vs_lora = paired_bootstrap(_correct_by_seed(runs), _correct_by_seed(ref_runs), names)
            rows.append({
                "setting": setting, "method": method, "lr": lr, "seeds": len(runs), "accuracy_mean": mean,
                "accuracy_std": std, "per_task": {n: _mean_std([r["accuracy"][n] for r in runs]) for n in names},
                "chance": chance, "zero_shot": zero_acc,
                "vs_zero_shot": paired_bootstrap(_correct_by_seed(runs), zero_correct, names) if zero_correct else None,
                "vs_lora": vs_lora, "trainable": runs[0]["trainable"],
                "step_time_s": sum(r["step_time_median_s"] for r in runs) / len(runs),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "active_mean": sum(a["mean"] for a in active) / len(active) if active else None,
                "experts": active[0]["experts"] if active else None, "active_per_layer": per_layer,
                "curve": _mean_curve(runs, zero, names), "routers": _router_shift(runs),
                "loss_first": sum(r["loss_first"] for r in runs) / len(runs),
                "loss_last10": sum(r["loss_last10"] for r in runs) / len(runs),
            })
    return rows


def _router_shift(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean over the seeds that measured both: experts per token, gate and τ before → after training."""
    pairs = [(r["active_start"], r["active"]) for r in runs if r.get("active_start") and r.get("active")]
    if not pairs:
        return None
    out: dict[str, Any] = {"seeds": len(pairs)}
    for key, field in (("active", "mean"), ("gate", "gate_mean"), ("threshold", "threshold_mean")):
        if all(field in a and field in b for a, b in pairs):
            out[key] = tuple(sum(p[i][field] for p in pairs) / len(pairs) for i in (0, 1))
    return out


def _mean_curve(runs: Sequence[dict[str, Any]], zero: dict[str, Any], names: Sequence[str]) -> list[list[float]] | None:
    """[(step, mean validation accuracy over seeds)], step 0 from the zero-shot scores."""
    curves = [r["curve"] for r in runs if r.get("curve")]
    if not curves:
        return None
    steps = sorted(set.intersection(*({p["step"] for p in c if p["mean"] is not None} for c in curves)))
    points = []
    start = [zero[n].get("curve_accuracy") for n in names if n in zero]
    if start and all(v is not None for v in start) and len(start) == len(names):
        points.append([0, sum(start) / len(start)])
    for step in steps:
        values = [p["mean"] for c in curves for p in c if p["step"] == step]
        points.append([step, sum(values) / len(values)])
    return points


def best_lrs(results: dict[str, Any]) -> dict[str, float]:
    """Each method's learning rate with the highest accuracy averaged over settings and seeds (a sweep's
    results, scored on the validation split); a tie goes to the smaller rate."""
    scores: dict[str, dict[float, list[float]]] = {}
    for _, method, lr, runs in _groups(results):
        scores.setdefault(method, {}).setdefault(lr, []).extend(r["mean_accuracy"] for r in runs)
    return {m: min(by_lr, key=lambda lr: (-sum(by_lr[lr]) / len(by_lr[lr]), lr)) for m, by_lr in scores.items()}


# --------------------------------------------------------------------------------------------------
# the papers' claims
# --------------------------------------------------------------------------------------------------

CLAIMS = (  # (claim, method, against, settings: "mixture" or "single", "better" or "no worse")
    ("MoA (soft) beats LoRA on the multi-task mixture", "soft_moa", "lora", "mixture", "better"),
    ("MoA (soft) beats top-k MoLE on the multi-task mixture", "soft_moa", "mole_topk", "mixture", "better"),
    ("Sparse MoA beats LoRA on the multi-task mixture", "sparse_moa", "lora", "mixture", "better"),
    ("Sparse MoA costs no accuracy against soft MoA (mixture)", "sparse_moa", "soft_moa", "mixture", "no worse"),
    ("AdaMoLE beats LoRA (single tasks)", "adamole", "lora", "single", "better"),
    ("AdaMoLE beats top-k MoLE (single tasks)", "adamole", "mole_topk", "single", "better"),
    ("AdaMoLE beats LoRA on the mixture", "adamole", "lora", "mixture", "better"),
    ("HydraLoRA beats LoRA on the mixture", "hydralora", "lora", "mixture", "better"),
)


def _verdict(test: dict[str, float] | None, *, no_cost: bool = False) -> str:
    if test is None:
        return "not measured"
    significant = test["p"] < 0.05
    if no_cost:  # the claim is "not worse": refuted only by a significant loss
        return "not supported (significantly worse)" if significant and test["delta"] < 0 else "supported (no significant loss)"
    if significant:
        return "supported" if test["delta"] > 0 else "contradicted (significantly worse)"
    return "not supported (no significant difference)"


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each claim of :data:`CLAIMS` with Δ, its interval and p (pooled over the matching settings by
    macro-averaging the per-setting tests' deltas; p and the interval from the pooled bootstrap)."""
    out = []
    for text, method, against, kind, sense in CLAIMS:
        settings = [s for s in results["config"]["settings"] if (len(parse_setting(s)) > 1) == (kind == "mixture")]
        arm, other, names = {}, {}, []
        for setting in settings:  # pool: every (setting, task) is one more task of the macro mean
            a = _best_runs(results, setting, method)
            b = _best_runs(results, setting, against)
            if not a or not b:
                continue
            for seed, by_task in _correct_by_seed(a).items():
                arm.setdefault(seed, {}).update({f"{setting}/{t}": v for t, v in by_task.items()})
            for seed, by_task in _correct_by_seed(b).items():
                other.setdefault(seed, {}).update({f"{setting}/{t}": v for t, v in by_task.items()})
            names += [f"{setting}/{t}" for t in parse_setting(setting)]
        shared = sorted(set(arm) & set(other))
        arm = {s: arm[s] for s in shared if all(n in arm[s] for n in names)}
        other = {s: other[s] for s in arm if all(n in other[s] for n in names)}
        test = paired_bootstrap(arm, other, names) if names and other else None
        out.append({"claim": text, "method": method, "against": against, "settings": kind, "test": test,
                    "verdict": _verdict(test, no_cost=sense == "no worse")})
    return out


def _best_runs(results: dict[str, Any], setting: str, method: str) -> list[dict[str, Any]]:
    candidates = [g[3] for g in _groups(results) if g[0] == setting and g[1] == method]
    return max(candidates, key=lambda rs: _mean_std([r["mean_accuracy"] for r in rs])[0]) if candidates else []


# config fields a combined report needs equal in every part besides EvalConfig.RUN_FIELDS: what the runs
# ran on (device, precision; "machine_device" is the device "auto" resolved to) and how peak RSS was taken
COMBINE_SAME = ("device", "precision", "machine_device", "isolate")


def combine(parts: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One results dict from several evaluations' ``(name, results)``: every run and zero-shot score,
    the union of their methods, settings and seeds, for one report whose claims pool all the settings.

    Refused (naming the parts): run settings that differ (``EvalConfig.RUN_FIELDS`` and
    :data:`COMBINE_SAME`, the device and precision runs used and how peak memory was taken: the runs
    or the columns would not be comparable), one run in two parts, or one task's zero-shot scored
    differently. Parts run with different ``workers`` keep theirs in ``config["workers_by_part"]``,
    which the report's caption names."""
    if not parts:
        raise InputError("combine: no results to combine; give two or more results folders")
    first_name, first = parts[0]
    fields = (*EvalConfig.RUN_FIELDS, *COMBINE_SAME)
    runs, zero, seen = [], {}, {}
    union = {"methods": [], "settings": [], "seeds": []}
    for name, results in parts:
        cfg = {**results["config"], "machine_device": results.get("machine", {}).get("device")}
        first_cfg = {**first["config"], "machine_device": first.get("machine", {}).get("device")}
        differ = [f for f in fields if cfg.get(f) != first_cfg.get(f)]
        if differ:
            said = ", ".join(f"{f} {first_cfg.get(f)!r} in {first_name}, {cfg.get(f)!r} in {name}" for f in differ)
            raise InputError(f"combine: {name} was run with other settings ({said}); its runs are not comparable")
        for run in results["runs"]:
            key = (run["method"], run["setting"], run["seed"], run["lr"])
            if key in seen:
                raise InputError(f"combine: the run {key} is in both {seen[key]} and {name}; keep it in one of them")
            seen[key] = name
            runs.append(run)
        for task, score in results.get("zero_shot", {}).items():
            if not isinstance(score, dict) or "correct" not in score:
                raise InputError(f"combine: {name}'s zero-shot score of {task!r} has no per-example results")
            if task in zero and zero[task][1]["correct"] != score["correct"]:
                raise InputError(f"combine: {zero[task][0]} and {name} scored {task!r} zero-shot differently; "
                                 "they were not made on the same examples")
            zero.setdefault(task, (name, score))
        for key in union:
            union[key] += [v for v in cfg.get(key, []) if v not in union[key]]
    config = {**first["config"], **union}
    workers = {name: r["config"].get("workers", 1) for name, r in parts}
    if len(set(workers.values())) > 1:
        config["workers"] = max(workers.values())
        config["workers_by_part"] = workers
    return {"runs": runs, "zero_shot": {t: score for t, (_, score) in zero.items()}, "config": config,
            "command": "; ".join(str(r.get("command")) for _, r in parts), "parts": [n for n, _ in parts],
            "machines": {n: r.get("machine") for n, r in parts},
            "failures": [f for _, r in parts for f in r.get("failures", [])]}


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _test_cell(test: dict[str, float] | None) -> str:
    if test is None:
        return "—"
    p = "p < 0.001" if test["p"] < 0.001 else f"p = {test['p']:.3f}"
    return f"{test['delta']:+.3f} [{test['low']:+.3f}, {test['high']:+.3f}] {p}"


def _table_cells(row: dict[str, Any]) -> list[str]:
    acc = _fmt(row["accuracy_mean"])
    if row["accuracy_std"] is not None:
        acc += f" ± {row['accuracy_std']:.3f} (n={row['seeds']})"
    active = "—" if row["active_mean"] is None else f"{row['active_mean']:.2f} of {row['experts']}"
    return [row["setting"], row["method"], "—" if row["lr"] is None else f"{row['lr']:g}", acc,
            _test_cell(row["vs_zero_shot"]), _test_cell(row["vs_lora"]),
            f"{row['trainable']:,}" if row["trainable"] else "0", _fmt(row["step_time_s"], ".2f"),
            _fmt(row["peak_rss_mb"], ".0f"), active]


def _workers_caption(cfg: dict[str, Any]) -> str:
    by_part = cfg.get("workers_by_part")
    if by_part:  # a combined report: say which folders ran several at once
        said = ", ".join(f"{name}: {n}" for name, n in by_part.items())
        return (f". Runs at once (`--workers`) by folder: {said}; the step times of folders with more than one "
                "include their contention for the cores, so they compare only within a folder")
    if cfg.get("workers", 1) > 1:
        return f". {cfg['workers']} runs ran at once (`--workers`), so step times include their contention for the cores"
    return ""


def _versions_line(results: dict[str, Any]) -> str:
    """How many runs ran under which torch / transformers: a folder resumed after an upgrade mixes them."""
    counts: dict[str, int] = {}
    for run in results.get("runs", []):
        v = run.get("versions")
        key = f"torch {v['torch']}, transformers {v['transformers']}" if v else "not recorded (runs before per-run versions)"
        counts[key] = counts.get(key, 0) + 1
    said = "; ".join(f"{key}: {n} run{'s' * (n != 1)}" for key, n in counts.items())
    return f"Library versions by run: {said or 'no runs'}."


def markdown_report(results: dict[str, Any]) -> str:
    """The Markdown: the main table, the claims, per-task accuracies of mixtures, budgets, data, setup."""
    rows = summarize(results)
    cfg = results["config"]
    out = ["## Results", "", "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    out += ["| " + " | ".join(_table_cells(row)) + " |" for row in rows]
    out += ["",
            f"Accuracy on the {cfg['split']} split: multiple choice by choice likelihood, free-text tasks by exact "
            f"match of the greedy answer's first line (chance 0); mean ± sample std over seeds; a mixture's accuracy "
            f"is the mean of its tasks'. Δ: against the zero-shot base model and against `lora` (its best lr), with "
            f"a paired bootstrap over seeds and examples ({RESAMPLES} resamples): 95% interval and two-sided p. Step "
            "time: median wall time of one training step (forward + backward + AdamW), averaged over seeds. Peak RSS: "
            "`resource.getrusage` maximum resident set of the process that ran the run (max over seeds)"
            + (" (one fresh process per run; the loaded base model included)" if cfg["isolate"] else
               " (one process for everything: cumulative, not per method)")
            + _workers_caption(cfg)
            + ". Active experts / token: mean over layers (and over a layer's routers) of the experts selected "
            "per token, on held-out prompts + answers without padding, out of E per router.", ""]
    verdicts = claims(results)
    if any(c["test"] for c in verdicts):
        out += ["### The papers' claims", "", "| claim | Δ [95% CI] p | verdict |", "|---|---|---|"]
        out += [f"| {c['claim']} | {_test_cell(c['test'])} | {c['verdict']} |" for c in verdicts]
        out.append("")
    for setting in (s for s in cfg["settings"] if len(parse_setting(s)) > 1):
        names = parse_setting(setting)
        out += [f"### Per-task accuracy, mixture `{setting}`", "",
                "| method | lr | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for row in (r for r in rows if r["setting"] == setting):
            cells = [_fmt(m) + ("" if s is None else f" ± {s:.3f}")
                     for m, s in (row["per_task"].get(n, (None, None)) for n in names)]
            out.append(f"| {row['method']} | {'—' if row['lr'] is None else format(row['lr'], 'g')} | "
                       + " | ".join(cells) + " |")
        out.append("")
    out += ["### Parameter budgets", "", "| method | trainable params | change from the preset |", "|---|---|---|"]
    seen = set()
    for row in rows:
        if row["method"] in BUDGET_CHANGES and row["method"] not in seen:
            seen.add(row["method"])
            out.append(f"| {row['method']} | {row['trainable']:,} | {BUDGET_CHANGES[row['method']]} |")
    out.append("")
    chart = terminal_chart(results, width=30, plain=True)
    if chart:
        out += ["### Active experts per token, per layer", "", "```", chart.rstrip(), "```", ""]
    shifts = [r for r in rows if r.get("routers")]
    if shifts:
        out += ["### Routers before and after training", "",
                "| setting | method | seeds | experts / token | gate g (mean over experts) | threshold τ |",
                "|---|---|---|---|---|---|"]
        for row in shifts:
            cells = ["—" if key not in row["routers"] else " → ".join(f"{v:.3f}" for v in row["routers"][key])
                     for key in ("active", "gate", "threshold")]
            out.append(f"| {row['setting']} | {row['method']} | {row['routers']['seeds']} | " + " | ".join(cells) + " |")
        out += ["", "Before → after fine-tuning, on the same held-out prompts + answers as the per-layer counts: "
                "token-weighted means over layers (and a layer's routers); an expert is selected where its gate "
                "passes the router's rule (top-k, or g > τ with a threshold).", ""]
    zero = results.get("zero_shot", {})
    if zero:
        out += ["### Data", "", "| task | train | scored | dropped long prompts | chance | zero-shot |",
                "|---|---|---|---|---|---|"]
        for n, z in zero.items():
            out.append(f"| {n} | {z['data']['train']} | {z['scored']} | {z['data']['dropped_long_prompts']} | "
                       f"{z['chance']:.2f} | {z['accuracy']:.3f} |")
        out.append("")
    if results.get("failures"):
        out += ["### Failures", ""] + [f"- {f}" for f in results["failures"]] + [""]
    out += ["### Setup", "", f"Command: `{results.get('command')}`", "", _versions_line(results), "", "```json",
            json.dumps(cfg, indent=1), "```", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# charts
# --------------------------------------------------------------------------------------------------

CHART_METHODS = ("adamole", "sparse_moa", "mole_topk", "sparse_moa_tau")


def _active_series(rows: Sequence[dict[str, Any]]) -> list[tuple[str, int, dict[str, float]]]:
    return [(f"{r['method']} · {r['setting']}", r["experts"], r["active_per_layer"]) for r in rows
            if r["method"] in CHART_METHODS and r.get("active_per_layer")]


def terminal_chart(results: dict[str, Any], *, width: int = 40, plain: bool = False) -> str:
    """Horizontal bars of the mean active experts per token, per layer, for the routed methods with a
    selection (one block per method and setting). ``plain`` gives text only; otherwise it is also
    printed with rich."""
    lines = []
    for title, experts, per_layer in _active_series(summarize(results)):
        lines.append(f"{title}: active experts per token per layer (bar full = all {experts})")
        for layer, value in per_layer.items():
            filled = value / experts * width if experts else 0
            bar = "█" * int(filled) + ("▌" if filled - int(filled) >= 0.5 else "")
            lines.append(f"  layer {int(layer):>2} │{bar:<{width}}│ {value:.2f}")
        lines.append("")
    text = "\n".join(lines)
    if text and not plain:
        from rich.console import Console

        Console().print(text, highlight=False, markup=False)
    return text


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png_curves(rows: Sequence[dict[str, Any]], settings: Sequence[str], path: pathlib.Path) -> pathlib.Path | None:
    plt = _pyplot()
    with_curves = [s for s in settings if any(r["setting"] == s and r.get("curve") for r in rows)]
    if plt is None or not with_curves:
        return None
    cols = min(3, len(with_curves))
    fig_rows = -(-len(with_curves) // cols)
    fig, axes = plt.subplots(fig_rows, cols, figsize=(4 * cols, 3 * fig_rows), squeeze=False)
    for ax, setting in zip(axes.flat, with_curves):
        for r in (r for r in rows if r["setting"] == setting and r.get("curve")):
            ax.plot([p[0] for p in r["curve"]], [p[1] for p in r["curve"]], marker=".", label=f"{r['method']}")
        ax.set_title(setting if len(setting) < 40 else "mixture", fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("validation accuracy", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(with_curves):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _png_active(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> pathlib.Path | None:
    plt = _pyplot()
    series = _active_series(rows)
    if plt is None or not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for title, experts, per_layer in series:
        ax.plot([int(k) for k in per_layer], [v / experts for v in per_layer.values()], marker="o",
                label=f"{title} (E={experts})")
    ax.set_xlabel("layer")
    ax.set_ylabel("active experts per token / E")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], out: str | os.PathLike) -> dict[str, pathlib.Path]:
    """``results.md``, ``active_experts.txt`` and, with matplotlib, ``accuracy_vs_step.png`` and
    ``active_experts.png`` in the folder ``out`` (the results JSON is the evaluation's own file);
    ``summary.json`` holds :func:`summarize` and :func:`claims`."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(results)
    paths = {"markdown": out / "results.md", "summary": out / "summary.json"}
    atomic_write_text(paths["markdown"], markdown_report(results))
    atomic_write_json(paths["summary"], {"rows": rows, "claims": claims(results)})
    chart = terminal_chart(results, plain=True)
    if chart:
        paths["chart"] = out / "active_experts.txt"
        atomic_write_text(paths["chart"], chart)
    for key, made in (("curves", _png_curves(rows, results["config"]["settings"], out / "accuracy_vs_step.png")),
                      ("png", _png_active(rows, out / "active_experts.png"))):
        if made:
            paths[key] = made
    return paths
