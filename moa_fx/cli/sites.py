"""Dry run of a spec: what each rule matches and the parameters the rewrite will add.

Nothing is rewritten: the graph is captured, :func:`moa_fx.sites.find_sites` places the rules, each
expert kind counts the parameters it adds at a site (``parameter_count``), and routers are counted
by instantiating them on the meta device (so an 8B config is counted in seconds). Exit status 2 when a required rule matches nothing; the
message names the nearest module paths.

examples:
  moa-fx sites tiny-llama --spec adamole
  moa-fx sites examples/configs/llama3-8b.json --spec sparse_moa
  moa-fx sites path/to/model --spec my_spec.toml --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import torch

from ..passes import LOWER_CHOICES
from ..errors import SiteMatchError
from ..kinds import kind_of
from ..modules import Router, Threshold
from ..sites import find_sites
from ..spec import RouterSpec, Spec, load_spec
from .models import MODEL_HELP, build, describe_model
from .render import compress_paths, render_sites

NAME = "sites"
HELP = "dry run: what each spec rule matches and how many parameters it adds"

META = torch.device("meta")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--spec", required=True, help="a preset name or a .toml/.json spec")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--lower", choices=LOWER_CHOICES, default="auto",
                   help="how LoRA mixtures will run: fused op chosen by the cost model (auto), dense, grouped, or off")
    p.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=None,
                   help="capture with dynamic batch/sequence (default: on, off for meta-device configs)")


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _expert_params(placement) -> int:
    return kind_of(placement.rule).parameter_count(placement.rule, placement.site)


def _router_params(spec: Spec, plan) -> dict[str, Any]:
    router = spec.router
    experts: dict[str, int] = {}
    dims: dict[str, int] = {}
    for p in plan.placements:
        if router.kind == "none":
            break
        key = p.site.path if router.kind == "site" else p.block
        experts[key] = experts.get(key, 0) + p.rule.expert_count
        dims[key] = p.site.d_in if router.kind == "site" else plan.blocks[key].dim
    params = tau = 0
    learned = router.select == "threshold" and router.threshold.learned
    for key, e in experts.items():
        params += _numel(Router(dims[key], e, router.form, router.has_bias, router.hidden_multiplier, device=META))
        if learned:
            tau += _numel(Threshold(dims[key], 0.5, device=META))
    return {"count": len(experts), "scope": router.scope, "form": router.form,
            "experts_per_router": sorted(set(experts.values())), "parameters": params + tau,
            "threshold_parameters": tau}


def _alone(gm, spec: Spec, rule):
    """(plan, None) for this rule placed on its own as a required rule, or (None, its SiteMatchError)."""
    alone = Spec(experts=(dataclasses.replace(rule, optional=False),), router=RouterSpec(scope="none"),
                 layers=spec.layers, name=spec.name)
    try:
        return find_sites(gm, alone), None
    except SiteMatchError as err:
        return None, str(err)


def sites_report(model_ref: str, spec_ref: str, dynamic: bool | None = None, lower: str = "auto") -> dict[str, Any]:
    """The dry-run report as plain data (what ``--json`` prints)."""
    spec = load_spec(spec_ref)
    built = build(model_ref, dynamic=dynamic)
    gm = built.gm
    base = sum(p.numel() for p in built.model.parameters())
    error = None
    try:
        plan = find_sites(gm, spec)
    except SiteMatchError as err:
        plan, error = None, str(err)
    # each rule alone: its own no-match message, and its matches when another rule broke the plan
    alone = {r.name: _alone(gm, spec, r) for r in spec.experts}
    rules, by_kind, trainable = [], {}, 0
    for rule in spec.experts:
        entry: dict[str, Any] = {"name": rule.name, "kind": rule.kind, "patterns": list(rule.patterns),
                                 "optional": rule.optional}
        own_plan = plan if plan is not None else alone[rule.name][0]
        placements = own_plan.by_rule(rule.name) if own_plan is not None else []
        if placements:
            n = sum(_expert_params(p) for p in placements)
            trainable += n
            by_kind[rule.kind] = by_kind.get(rule.kind, 0) + n
            paths = [p.site.path for p in placements]
            entry.update(status="matched", sites=len(paths), matched=compress_paths(paths), paths=paths,
                         parameters=n, experts_per_site=rule.expert_count)
        else:
            message = alone[rule.name][1] or error or "matched nothing after layers/exclude"
            entry.update(status="unmatched (optional)" if rule.optional else "unmatched", sites=0, matched=[],
                         paths=[], parameters=0, message=message)
        rules.append(entry)
    routers = _router_params(spec, plan) if plan is not None else \
        {"count": 0, "scope": spec.router.scope, "form": spec.router.form, "experts_per_router": [],
         "parameters": 0, "threshold_parameters": 0}
    if routers["parameters"]:
        by_kind["router"] = routers["parameters"]
    lowering: dict[str, Any] = {}
    if plan is not None and lower != "off":
        from ..passes.lowering_form import plan_lowering

        per_site = plan_lowering(gm, plan, spec, lower)
        counts: dict[str, int] = {}
        reasons: dict[str, str] = {}
        for info in per_site.values():
            counts[info["form"]] = counts.get(info["form"], 0) + 1
            reasons.setdefault(info["form"], info["reason"])
        lowering = {"mode": lower, "counts": counts, "example_reason": reasons, "sites": per_site}
    trainable += routers["parameters"]
    return {
        "model": model_ref, "description": describe_model(built.model, built.how), "spec": spec.name,
        "ok": plan is not None, "error": error, "rules": rules, "routers": routers,
        "parameters_by_kind": by_kind, "trainable": trainable, "base": base, "lowering": lowering,
        "trainable_percent": 100.0 * trainable / max(base + trainable, 1),
        # choices made for the user: which input a multi-input span reads, a raw block input for the router
        "notes": [{"note": text, "paths": compress_paths(paths)}
                  for text, paths in (plan.notes if plan is not None else {}).items()],
    }


def run(args: argparse.Namespace, console) -> int:
    report = sites_report(args.model, args.spec, args.dynamic, args.lower)
    if args.json:
        console.file.write(json.dumps(report, indent=1, sort_keys=True) + "\n")
    else:
        console.print(report["description"])
        render_sites(console, report)
        low = report["lowering"]
        if low:
            for form, n in sorted(low["counts"].items()):
                console.print(f"lowering ({low['mode']}): {n} LoRA sites {form} — {low['example_reason'][form]}",
                              soft_wrap=True)
        if report["error"] and all(r["status"] == "matched" for r in report["rules"]):
            console.print(f"[red]error[/red]: {report['error']}", soft_wrap=True)
    return 0 if report["ok"] else 2
