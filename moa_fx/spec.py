"""The declarative spec: which experts go where, and how they are routed.

Map of this module
- :class:`LoraExpert`, :class:`ParallelAdapterExpert`, :class:`PromptExpert`: one dataclass per
  expert kind; ``EXPERT_KINDS`` maps the ``kind`` string to its class.
- :class:`ThresholdSpec`, :class:`RouterSpec`: how experts are gated and selected.
- :class:`Spec`: the whole spec; :func:`load_spec` reads TOML, JSON, a dict or a preset name.
- :func:`spec_reference`: the reference table printed in the README and by the CLI, generated from
  the field metadata (the help text lives in one place: here).

Every dataclass is frozen and validates itself in ``__post_init__``; a bad value raises
:class:`~moa_fx.errors.SpecError` naming the field, the value and the allowed values.

Example (AdaMoLE, four rank-4 LoRA experts per projection)::

    Spec(
        experts=(LoraExpert(at=("*.q_proj", "*.v_proj"), r=4, alpha=16, dropout=0.05, count=4),),
        router=RouterSpec(scope="site", gate="softmax", select="threshold",
                          threshold=ThresholdSpec(learned=True, rule="adamole"),
                          aux_loss_coef=1e-3),
    )
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import tomllib
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .errors import SpecError

__all__ = [
    "LoraExpert",
    "ParallelAdapterExpert",
    "PromptExpert",
    "ThresholdSpec",
    "RouterSpec",
    "Spec",
    "ExpertSpec",
    "EXPERT_KINDS",
    "load_spec",
    "spec_from_dict",
    "spec_to_dict",
    "spec_reference",
    "spec_to_toml",
    "check_pattern",
]


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


def _fail(where: str, value: Any, allowed: str, fix: str = "") -> SpecError:
    msg = f"{where} = {value!r} is not valid; {allowed}"
    if fix:
        msg += f" ({fix})"
    return SpecError(msg)


def _check_choice(where: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise _fail(where, value, "choose one of " + ", ".join(repr(c) for c in choices))


MAX_PATTERN_LENGTH = 200
MAX_REGEX_REPEATS = 3  # a regex's matching time grows as (path length)^(repeats): keep it small


def check_pattern(where: str, pattern: Any) -> str:
    """Refuse a pattern that is not a non-empty string, is too long, or (``re:``) is a regex whose
    matching can blow up. Python's ``re`` backtracks: ``(.*)*x`` takes exponential time on a path
    that does not match, so nested quantifiers, quantified alternations and back-references are
    refused, and at most :data:`MAX_REGEX_REPEATS` quantifiers are allowed (globs are matched with
    atomic groups and are linear). Every pattern passes here before it reaches ``re``: spec files,
    adapter directories' configs and :func:`moa_fx.sites.match_rank` alike."""
    if not isinstance(pattern, str) or not pattern:
        raise _fail(where, pattern, "each pattern must be a non-empty string")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise _fail(where, pattern[:40] + "...", f"a pattern may have at most {MAX_PATTERN_LENGTH} characters "
                    f"(this one has {len(pattern)})")
    if pattern.startswith("re:"):
        problem = _regex_problem(pattern[3:])
        if problem:
            raise _fail(where, pattern, f"this regular expression {problem}",
                        "write it without nested or repeated groups, or use a glob such as 'model.layers.*.q_proj'")
    return pattern


def _regex_problem(regex: str) -> str | None:
    import re
    try:
        import re._parser as sre_parse  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import sre_parse  # type: ignore[no-redef]

    try:
        tree = sre_parse.parse(regex)
        re.compile(regex)
    except (re.error, RecursionError, OverflowError) as err:
        return f"does not compile ({err})"
    names = sre_parse
    repeats = (names.MAX_REPEAT, names.MIN_REPEAT, getattr(names, "POSSESSIVE_REPEAT", names.MAX_REPEAT))
    count = 0

    def subpatterns(av: Any):
        if isinstance(av, sre_parse.SubPattern):
            yield av
        elif isinstance(av, (tuple, list)):
            for a in av:
                yield from subpatterns(a)

    def walk(sub, inside_repeat: bool) -> str | None:
        nonlocal count
        for op, av in sub.data:
            if op in (names.GROUPREF, names.GROUPREF_EXISTS):
                return "uses a back-reference (which needs backtracking)"
            repeated = op in repeats and av[1] > 1
            if repeated:
                if inside_repeat:
                    return "has a nested quantifier, as in '(a+)+' or '(.*)*' (exponential backtracking)"
                count += 1
            if op == names.BRANCH and inside_repeat:
                return "repeats an alternation, as in '(a|ab)*' (exponential backtracking)"
            for child in subpatterns(av):
                found = walk(child, inside_repeat or repeated)
                if found:
                    return found
        return None

    found = walk(tree, False)
    if found is None and count > MAX_REGEX_REPEATS:
        found = (f"has {count} quantifiers; at most {MAX_REGEX_REPEATS} are allowed (matching time grows as "
                 "path length to that power)")
    return found


def _as_patterns(where: str, value: Any, one_string: bool = True) -> tuple[str, ...]:
    """A pattern list. ``one_string``: a bare string is one pattern (``at = "*.q_proj"``); otherwise
    (``exclude``, which may be empty) a string is refused: iterating it would give one pattern per
    character."""
    if isinstance(value, str):
        if not one_string:
            raise _fail(where, value, "give a list of patterns, not a string",
                        f"write {where.rsplit('.', 1)[-1]} = [{value!r}]")
        value = (value,)
    if not isinstance(value, (list, tuple)) or (one_string and not value):
        raise _fail(where, value, "give a module-path glob such as '*.q_proj' or a list of them "
                    "(prefix 're:' for a regular expression)")
    return tuple(check_pattern(where, p) for p in value)


def _as_layers(where: str, value: Any) -> tuple[int, ...] | None:
    """``None`` (all layers), ``[lo, hi]`` as {from=lo, to=hi}, or an explicit list of indices."""
    if value is None:
        return None
    if isinstance(value, dict):
        unknown = set(value) - {"from", "to"}
        if unknown or "from" not in value or "to" not in value:
            raise _fail(where, value, "write a range as {from = 0, to = 15} (both ends included) "
                        "or a list of layer indices")
        lo, hi = value["from"], value["to"]
        if not (isinstance(lo, int) and isinstance(hi, int)) or lo < 0 or hi < lo:
            raise _fail(where, value, "a range needs integers 0 <= from <= to")
        return tuple(range(lo, hi + 1))
    if isinstance(value, (list, tuple)) and value and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        return tuple(sorted(set(value)))
    raise _fail(where, value, "give a list of non-negative layer indices or {from = a, to = b}")


def _positive_int(where: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise _fail(where, value, "it must be a positive integer")


def _number(where: str, value: Any, interval: str) -> None:
    """``value`` is a finite real number (not a bool) inside ``interval``, written as ``"[0, 1)"``,
    ``"(0, 1]"``, ``"(0, inf)"`` or ``"[0, inf)"``; NaN and ±inf never pass."""
    lo_open, hi_open = interval[0] == "(", interval[-1] == ")"
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        if math.isinf(hi):
            raise _fail(where, value, f"it must be a finite number {'>' if lo_open else '>='} {lo:g}")
        raise _fail(where, value, f"it must be in {interval}")


def _check_name(where: str, value: Any) -> None:
    """Expert names become module-path components (``<site>.<name>.<i>``): an identifier that is not
    an attribute every module has (``weight``, ``bias``, ``forward``, ...)."""
    import torch

    if not isinstance(value, str) or not value.isidentifier() or len(value) > 64:
        raise _fail(where, value, "an expert name must be an identifier of at most 64 characters "
                    "(letters, digits, '_'; it becomes part of parameter names)")
    if hasattr(torch.nn.Linear(1, 1, device="meta"), value):
        raise _fail(where, value, "it collides with an attribute of torch modules", "choose another name")


# --------------------------------------------------------------------------------------------------
# Expert kinds
# --------------------------------------------------------------------------------------------------


def _check_rule(rule: Any, patterns: str) -> None:
    """The fields every expert kind has: its patterns, exclude, layers, optional and name."""
    where = f"expert.{rule.kind}"
    object.__setattr__(rule, patterns, _as_patterns(f"{where}.{patterns}", getattr(rule, patterns)))
    object.__setattr__(rule, "exclude", _as_patterns(f"{where}.exclude", rule.exclude, one_string=False))
    object.__setattr__(rule, "layers", _as_layers(f"{where}.layers", rule.layers))
    if not isinstance(rule.optional, bool):
        raise _fail(f"{where}.optional", rule.optional, "it must be true or false")
    _check_name(f"{where}.name", rule.name)


@dataclass(frozen=True)
class LoraExpert:
    """LoRA experts at linear projections: ``s·B(A(dropout(x)))`` with ``s = alpha / r``."""

    kind: Literal["lora"] = field(default="lora", metadata=_help("expert kind"))
    at: tuple[str, ...] = field(default=("*.q_proj", "*.v_proj"), metadata=_help(
        "module-path globs (or 're:<regex>') of the projections that get the experts"))
    r: int | tuple[int, ...] = field(default=8, metadata=_help(
        "rank of each expert; a list gives one expert per rank (heterogeneous mixture)"))
    alpha: float = field(default=8.0, metadata=_help("LoRA alpha; the scale is alpha / r per expert"))
    dropout: float = field(default=0.0, metadata=_help(
        "dropout on the expert input, drawn independently in each expert; the router reads the undropped input"))
    count: int = field(default=1, metadata=_help(
        "experts per site when r is one number (r is then shared by all of them)"))
    share_a: bool = field(default=False, metadata=_help(
        "one shared A and one B per expert (HydraLoRA); needs equal ranks"))
    layers: tuple[int, ...] | None = field(default=None, metadata=_help(
        "only these layer indices (list, or {from, to} both included); default: the spec's layers"))
    exclude: tuple[str, ...] = field(default=(), metadata=_help("globs of module paths to leave out"))
    optional: bool = field(default=False, metadata=_help(
        "allow patterns to match nothing (otherwise every pattern must match at least one module)"))
    name: str = field(default="lora", metadata=_help("expert name used in parameter names and router stats"))

    def __post_init__(self) -> None:
        _check_rule(self, "at")
        ranks = self.r if isinstance(self.r, (list, tuple)) else (self.r,)
        if not ranks:
            raise _fail("expert.lora.r", self.r, "give a positive rank or a non-empty list of ranks")
        for rank in ranks:
            _positive_int("expert.lora.r", rank)
        _positive_int("expert.lora.count", self.count)
        if isinstance(self.r, (list, tuple)):
            if self.count not in (1, len(ranks)):
                raise _fail("expert.lora.count", self.count,
                            f"with a list of {len(ranks)} ranks, count must be 1 or {len(ranks)}",
                            "drop count: one expert is made per listed rank")
            object.__setattr__(self, "r", tuple(ranks))
        _number("expert.lora.alpha", self.alpha, "(0, inf)")
        _number("expert.lora.dropout", self.dropout, "[0, 1)")
        if self.share_a and len(set(self.ranks)) != 1:
            raise _fail("expert.lora.share_a", self.share_a, "a shared A needs every expert to have the same rank")

    @property
    def ranks(self) -> tuple[int, ...]:
        """The rank of every expert this rule places at one site."""
        if isinstance(self.r, tuple):
            return self.r
        return (self.r,) * self.count

    @property
    def patterns(self) -> tuple[str, ...]:
        return self.at


@dataclass(frozen=True)
class ParallelAdapterExpert:
    """A bottleneck adapter beside a whole module span: ``W_up·act(W_down·h + b_down) + b_up``."""

    kind: Literal["parallel_adapter"] = field(default="parallel_adapter", metadata=_help("expert kind"))
    around: tuple[str, ...] = field(default=("*.mlp",), metadata=_help(
        "module-path globs of the spans (module boundaries) the adapter runs beside"))
    bottleneck: int = field(default=16, metadata=_help("bottleneck width"))
    activation: Literal["silu", "relu", "gelu"] = field(default="silu", metadata=_help("bottleneck activation"))
    init_gain: float = field(default=1e-4, metadata=_help("Xavier-uniform gain of both weights (biases start at 0)"))
    layers: tuple[int, ...] | None = field(default=None, metadata=_help("only these layer indices"))
    exclude: tuple[str, ...] = field(default=(), metadata=_help("globs of module paths to leave out"))
    optional: bool = field(default=False, metadata=_help(
        "allow patterns to match nothing (otherwise every pattern must match at least one module)"))
    name: str = field(default="pa", metadata=_help("expert name"))

    def __post_init__(self) -> None:
        _check_rule(self, "around")
        _positive_int("expert.parallel_adapter.bottleneck", self.bottleneck)
        _check_choice("expert.parallel_adapter.activation", self.activation, ("silu", "relu", "gelu"))
        _number("expert.parallel_adapter.init_gain", self.init_gain, "(0, inf)")

    @property
    def patterns(self) -> tuple[str, ...]:
        return self.around


@dataclass(frozen=True)
class PromptExpert:
    """Prompt-tuning expert inside attention: L learned prompts attended by the query after RoPE."""

    kind: Literal["prompt"] = field(default="prompt", metadata=_help("expert kind"))
    at: tuple[str, ...] = field(default=("*.self_attn",), metadata=_help(
        "module-path globs of the attention modules (their attention op is found in the graph)"))
    length: int = field(default=10, metadata=_help("number of prompt vectors L"))
    layers: tuple[int, ...] | None = field(default=None, metadata=_help("only these layer indices"))
    exclude: tuple[str, ...] = field(default=(), metadata=_help("globs of module paths to leave out"))
    optional: bool = field(default=False, metadata=_help(
        "allow patterns to match nothing (otherwise every pattern must match at least one module)"))
    name: str = field(default="prompt", metadata=_help("expert name"))

    def __post_init__(self) -> None:
        _check_rule(self, "at")
        _positive_int("expert.prompt.length", self.length)

    @property
    def patterns(self) -> tuple[str, ...]:
        return self.at


ExpertSpec = Union[LoraExpert, ParallelAdapterExpert, PromptExpert]
EXPERT_KINDS: dict[str, type] = {
    "lora": LoraExpert,
    "parallel_adapter": ParallelAdapterExpert,
    "prompt": PromptExpert,
}


# --------------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdSpec:
    """The per-token threshold τ of threshold selection."""

    learned: bool = field(default=False, metadata=_help(
        "learn τ = max · sigmoid(W_t h + b_t) per token; otherwise τ = value, a constant"))
    value: float = field(default=0.5, metadata=_help("the constant threshold when learned = false"))
    max: float | None = field(default=None, metadata=_help(
        "τ_max of the learned threshold; default 1/E (AdaMoLE)"))
    rule: Literal["adamole", "moa"] = field(default="adamole", metadata=_help(
        "'adamole': w = (g − τ)·sel, renormalised (τ learns); 'moa': w = g·sel (τ gets no gradient)"))

    def __post_init__(self) -> None:
        _check_choice("router.threshold.rule", self.rule, ("adamole", "moa"))
        if not isinstance(self.learned, bool):
            raise _fail("router.threshold.learned", self.learned, "it must be true or false")
        _number("router.threshold.value", self.value, "[0, 1]")
        if self.max is not None:
            _number("router.threshold.max", self.max, "(0, 1]")


@dataclass(frozen=True)
class RouterSpec:
    """How the experts are gated: where the router sits, its form, the gate and the selection."""

    scope: str = field(default="none", metadata=_help(
        "'none' (every expert weight 1), 'site' (one router per projection, AdaMoLE), or a block "
        "glob like 'model.layers.*' (one router per block for every expert inside it, MoA)"))
    input: Literal["normed", "raw"] = field(default="normed", metadata=_help(
        "block routers read the block's normalised input (input_layernorm) or its raw input"))
    form: Literal["linear", "swiglu"] = field(default="linear", metadata=_help(
        "router network: linear d→E, or SwiGLU with hidden E·hidden_multiplier"))
    hidden_multiplier: int = field(default=4, metadata=_help("SwiGLU router hidden size is E times this"))
    bias: bool | None = field(default=None, metadata=_help(
        "give the linear router a bias; default: true for block routers (MoA's native linear router), false per site"))
    gate: Literal["softmax", "sigmoid"] = field(default="softmax", metadata=_help(
        "gate function on the router logits (softmax is computed in fp32)"))
    select: Literal["dense", "topk", "threshold"] = field(default="dense", metadata=_help(
        "dense (every expert, weighted), top-k, or threshold (constant or learned)"))
    top_k: int = field(default=2, metadata=_help("experts per token when select = 'topk'"))
    threshold: ThresholdSpec = field(default_factory=ThresholdSpec, metadata=_help(
        "threshold settings when select = 'threshold'"))
    renormalize: bool | None = field(default=None, metadata=_help(
        "divide the selected weights by their sum; default: true for softmax, false for sigmoid"))
    aux_loss_coef: float = field(default=0.0, metadata=_help(
        "coefficient of the load-balancing loss E·Σ f_e·P_e added to the loss in training"))

    def __post_init__(self) -> None:
        if not isinstance(self.scope, str) or not self.scope:
            raise _fail("router.scope", self.scope, "choose 'none', 'site' or a block glob like 'model.layers.*'")
        if self.scope not in ("none", "site", "@blocks"):
            check_pattern("router.scope", self.scope)
        _check_choice("router.input", self.input, ("normed", "raw"))
        _check_choice("router.form", self.form, ("linear", "swiglu"))
        _positive_int("router.hidden_multiplier", self.hidden_multiplier)
        _check_choice("router.gate", self.gate, ("softmax", "sigmoid"))
        _check_choice("router.select", self.select, ("dense", "topk", "threshold"))
        _positive_int("router.top_k", self.top_k)
        if isinstance(self.threshold, dict):
            object.__setattr__(self, "threshold", _build(ThresholdSpec, self.threshold, "router.threshold"))
        if not isinstance(self.threshold, ThresholdSpec):
            raise _fail("router.threshold", self.threshold, "give a table such as {learned = true}")
        _number("router.aux_loss_coef", self.aux_loss_coef, "[0, inf)")
        if self.bias is not None and not isinstance(self.bias, bool):
            raise _fail("router.bias", self.bias, "it must be true, false or left out")
        if self.renormalize is not None and not isinstance(self.renormalize, bool):
            raise _fail("router.renormalize", self.renormalize, "it must be true, false or left out")
        if self.scope == "none" and self.select != "dense":
            raise _fail("router.select", self.select, "without a router (scope = 'none') only 'dense' applies",
                        "set router.scope to 'site' or a block glob")

    @property
    def kind(self) -> str:
        """'none', 'site' or 'block'."""
        return self.scope if self.scope in ("none", "site") else "block"

    @property
    def has_bias(self) -> bool:
        return self.bias if self.bias is not None else self.kind == "block"

    @property
    def renormalizes(self) -> bool:
        if self.renormalize is not None:
            return self.renormalize
        return self.gate == "softmax"


@dataclass(frozen=True)
class Spec:
    """A whole moa-fx spec: expert rules, one routing rule, and the layers they apply to."""

    experts: tuple[ExpertSpec, ...] = field(default=(), metadata=_help("the expert rules, in order"))
    router: RouterSpec = field(default_factory=RouterSpec, metadata=_help("how the experts are routed"))
    layers: tuple[int, ...] | None = field(default=None, metadata=_help(
        "layer indices that get experts (list or {from, to}); default all"))
    name: str = field(default="custom", metadata=_help("a name for this spec (shown by the CLI)"))
    description: str = field(default="", metadata=_help("free text"))

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            object.__setattr__(self, "router", _build(RouterSpec, self.router, "router"))
        experts = tuple(_expert_from_any(e, i) for i, e in enumerate(self.experts))
        if not experts:
            raise SpecError("spec.experts is empty; add at least one [[expert]] table such as "
                            "{kind = 'lora', at = ['*.q_proj'], r = 8}")
        names = [e.name for e in experts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SpecError(f"expert names must be unique; {dup} appear more than once "
                            "(give each [[expert]] its own name = '...')")
        object.__setattr__(self, "experts", experts)
        object.__setattr__(self, "layers", _as_layers("spec.layers", self.layers))
        r = self.router
        if r.kind == "site" and any(not isinstance(e, LoraExpert) for e in experts):
            raise _fail("router.scope", r.scope, "per-site routers gate LoRA experts only",
                        "use a block scope such as 'model.layers.*' for parallel adapters and prompts")
        if r.select == "topk" and r.kind == "site":
            for e in experts:
                if r.top_k > len(e.ranks):
                    raise _fail("router.top_k", r.top_k,
                                f"expert '{e.name}' has only {len(e.ranks)} experts per site; top_k must be <= {len(e.ranks)}")


def _expert_from_any(value: Any, index: int) -> ExpertSpec:
    if isinstance(value, tuple(EXPERT_KINDS.values())):
        return value
    if not isinstance(value, dict):
        raise _fail(f"experts[{index}]", value, "each expert is a table with a 'kind'")
    kind = value.get("kind")
    if kind not in EXPERT_KINDS:
        raise _fail(f"experts[{index}].kind", kind, "choose one of " + ", ".join(repr(k) for k in EXPERT_KINDS))
    return _build(EXPERT_KINDS[kind], value, f"experts[{index}] ({kind})")


# PEFT's names for our fields, so a PEFT user's guess gets a precise hint
_PEFT_NAMES = {"rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "at",
               "num_experts": "count", "layers_to_transform": "layers", "exclude_modules": "exclude",
               "top_k_experts": "top_k", "threshold_max": "max"}


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise _fail(where, data, "expected a table")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        import difflib

        hints = []
        for u in unknown:
            close = [_PEFT_NAMES[u]] if _PEFT_NAMES.get(u) in names else difflib.get_close_matches(u, names, n=1)
            hints.append(f"'{u}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise SpecError(f"{where}: unknown field {', '.join(hints)}; allowed fields: {', '.join(sorted(names))}")
    hints = get_type_hints(cls)
    kwargs = {}
    for key, val in data.items():
        if not (key == "layers" and isinstance(val, dict)):  # {from, to} is checked by _as_layers
            _check_type(f"{where}.{key}", val, hints[key])
        if isinstance(val, list):
            val = tuple(val)
        kwargs[key] = val
    return cls(**kwargs)


def _check_type(where: str, value: Any, hint: Any) -> None:
    """A shallow type check with a clear message (the dataclass checks ranges)."""
    allowed: list[type] = []

    def collect(h: Any) -> None:
        origin = get_origin(h)
        if origin is Union or origin is types.UnionType:
            for a in get_args(h):
                collect(a)
        elif origin is Literal:
            allowed.extend(type(a) for a in get_args(h))
        elif origin in (tuple, list):
            allowed.extend((list, tuple))
            if get_args(h) and get_args(h)[0] is str:
                allowed.append(str)  # one pattern may be written without a list
        elif h is type(None):
            allowed.append(type(None))
        elif h is float:
            allowed.extend((float, int))
        elif isinstance(h, type):
            allowed.append(h)
        else:
            allowed.append(object)

    collect(hint)
    if dict in allowed or object in allowed:
        return
    if any(isinstance(value, t) for t in allowed) and not (isinstance(value, bool) and bool not in allowed
                                                          and int in allowed):
        return
    if isinstance(value, dict) and any(dataclasses.is_dataclass(t) for t in allowed):
        return
    names = sorted({t.__name__ if t is not type(None) else "none" for t in allowed})
    raise SpecError(f"{where} = {value!r} has type {type(value).__name__}; expected {' or '.join(names)}")


# --------------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------------


def spec_from_dict(data: dict) -> Spec:
    """Build a spec from plain data: ``{"expert": [...], "router": {...}, "layers": ...}``.

    Both ``expert`` (TOML's ``[[expert]]``) and ``experts`` are accepted as the list key.
    """
    if not isinstance(data, dict):
        raise SpecError(f"a spec must be a table/object, got {type(data).__name__}")
    data = dict(data)
    if "expert" in data and "experts" in data:
        raise SpecError("give the expert list once, as [[expert]] (or 'experts' in JSON), not both")
    if "expert" in data:
        data["experts"] = data.pop("expert")
    if not isinstance(data.get("experts", []), (list, tuple)):
        raise SpecError("spec.experts must be a list of expert tables ([[expert]] in TOML)")
    return _build(Spec, data, "spec")


def spec_to_dict(spec: Spec) -> dict:
    """Plain JSON-able data that :func:`spec_from_dict` turns back into an equal spec."""

    def clean(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: clean(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, (list, tuple)):
            return [clean(x) for x in obj]
        return obj

    data = clean(spec)
    return data


def load_spec(source: str | pathlib.Path | dict | Spec) -> Spec:
    """Load a spec from a preset name, a ``.toml`` or ``.json`` file, a dict, or pass a Spec through.

    >>> load_spec("adamole").router.select
    'threshold'
    """
    if isinstance(source, Spec):
        return source
    if isinstance(source, dict):
        return spec_from_dict(source)
    from . import presets

    text = str(source)
    if text in presets.PRESETS:
        return presets.get(text)
    path = pathlib.Path(text)
    if not path.exists():
        import difflib

        close = difflib.get_close_matches(text, list(presets.PRESETS), n=3)
        hint = f" did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise SpecError(f"spec '{text}' is neither a preset nor an existing file;{hint} presets: "
                        + ", ".join(sorted(presets.PRESETS)))
    raw = path.read_bytes()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(raw.decode("utf-8"))
        elif path.suffix == ".json":
            data = json.loads(raw.decode("utf-8"))
        else:
            raise SpecError(f"spec file '{path}' must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"spec file '{path}' is not valid {path.suffix[1:].upper()}: {err}") from None
    return spec_from_dict(data)


def spec_reference() -> str:
    """A Markdown reference of every spec field, generated from the field metadata."""
    lines = []
    for title, cls in [("[router]", RouterSpec), ("[router.threshold]", ThresholdSpec),
                       *[(f"[[expert]] kind = '{k}'", c) for k, c in EXPERT_KINDS.items()],
                       ("top level", Spec)]:
        lines.append(f"#### {title}\n")
        lines.append("| field | default | meaning |")
        lines.append("|---|---|---|")
        for f in dataclasses.fields(cls):
            if f.name == "kind" or (cls is Spec and f.name in ("experts", "router")):
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = "(table)"
            else:
                default = ""
            if isinstance(default, tuple):
                default = list(default)
            lines.append(f"| `{f.name}` | `{json.dumps(default) if default != '(table)' else default}` | "
                         f"{f.metadata.get('help', '')} |")
        lines.append("")
    return "\n".join(lines)


def spec_to_toml(spec: Spec, comment: str = "") -> str:
    """The spec as TOML that :func:`load_spec` reads back into an equal spec (defaults left out)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    def table(obj: Any, skip: tuple[str, ...] = ()) -> list[str]:
        lines = []
        for f in dataclasses.fields(obj):
            if f.name in skip:
                continue
            v = getattr(obj, f.name)
            quiet = {"exclude": (), "optional": False, "share_a": False, "description": "", "top_k": 2,
                     "hidden_multiplier": 4, "init_gain": 1e-4, "activation": "silu"}
            if v is None or dataclasses.is_dataclass(v) or (f.name in quiet and v == quiet[f.name]
                                                           and not (f.name == "top_k" and spec.router.select == "topk")
                                                           and not (f.name == "hidden_multiplier" and spec.router.form == "swiglu")):
                continue
            if f.name == "value" and obj.learned:
                continue
            if isinstance(v, tuple) and f.name == "layers":
                v = list(v)
            lines.append(f"{f.name} = {value(v)}")
        return lines

    out = [f"# {line}".rstrip() for line in comment.strip().splitlines()] if comment else []
    out += table(spec, skip=("experts", "router"))
    out += ["", "[router]", *table(spec.router, skip=("threshold",))]
    if spec.router.select == "threshold":
        out += ["", "[router.threshold]", *table(spec.router.threshold)]
    for e in spec.experts:
        out += ["", "[[expert]]", *table(e)]
    return "\n".join(out) + "\n"
