"""The spec's types: which experts go where, and how they are routed.

Map of this module
- :class:`ExpertSpec`: the base of every expert kind's spec class; :class:`LoraExpert`,
  :class:`ParallelAdapterExpert`, :class:`PromptExpert` are the built-in kinds. ``EXPERT_KINDS``
  maps the ``kind`` string (the TOML key) to its class; :func:`register_expert_spec` adds a kind
  (what :func:`moa_fx.kinds.register` calls).
- :class:`ThresholdSpec`, :class:`RouterSpec`: how experts are gated and selected.
- :class:`Spec`: the whole spec.
- The validation helpers the dataclasses (and new kinds' spec classes) share: :func:`check_pattern`,
  :func:`check_choices` (allowed values read from the field's ``Literal``), ranges, layers, names.
Reading and writing (TOML, JSON, dicts, the reference table) is :mod:`moa_fx.spec.io`; named presets
are :mod:`moa_fx.spec.presets`.

Every dataclass is frozen and validates itself in ``__post_init__``; a bad value raises
:class:`~moa_fx.errors.SpecError` naming the field, the value and the allowed values. The help text
of each field lives here, in its metadata, and nowhere else.

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
import functools
import math
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from ..errors import SpecError

__all__ = [
    "LoraExpert",
    "ParallelAdapterExpert",
    "PromptExpert",
    "ThresholdSpec",
    "RouterSpec",
    "Spec",
    "ExpertSpec",
    "EXPERT_KINDS",
    "register_expert_spec",
    "check_pattern",
    "check_choices",
    "build_table",
    "check_rule",
    "fail",
    "help_text",
    "check_number",
    "check_positive_int",
]


def help_text(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


def fail(where: str, value: Any, allowed: str, fix: str = "") -> SpecError:
    msg = f"{where} = {value!r} is not valid; {allowed}"
    if fix:
        msg += f" ({fix})"
    return SpecError(msg)


@functools.cache
def _literal_choices(cls: type, name: str) -> tuple:
    """The values the ``Literal`` annotation of field ``name`` of ``cls`` allows."""
    hint = get_type_hints(cls)[name]
    if get_origin(hint) is not Literal:
        raise TypeError(f"{cls.__name__}.{name} is not annotated with a Literal")
    return get_args(hint)


def check_choices(obj: Any, prefix: str, *names: str) -> None:
    """Refuse a value of field ``name`` of ``obj`` that its ``Literal[...]`` annotation does not list
    (``prefix`` names the table in the message: ``router``)."""
    for name in names:
        choices = _literal_choices(type(obj), name)
        value = getattr(obj, name)
        if value not in choices:
            raise fail(f"{prefix}.{name}", value, "choose one of " + ", ".join(repr(c) for c in choices))


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
        raise fail(where, pattern, "each pattern must be a non-empty string")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise fail(where, pattern[:40] + "...", f"a pattern may have at most {MAX_PATTERN_LENGTH} characters "
                   f"(this one has {len(pattern)})")
    if pattern.startswith("re:"):
        problem = _regex_problem(pattern[3:])
        if problem:
            raise fail(where, pattern, f"this regular expression {problem}",
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
            raise fail(where, value, "give a list of patterns, not a string",
                       f"write {where.rsplit('.', 1)[-1]} = [{value!r}]")
        value = (value,)
    if not isinstance(value, (list, tuple)) or (one_string and not value):
        raise fail(where, value, "give a module-path glob such as '*.q_proj' or a list of them "
                   "(prefix 're:' for a regular expression)")
    return tuple(check_pattern(where, p) for p in value)


def _as_layers(where: str, value: Any) -> tuple[int, ...] | None:
    """``None`` (all layers), ``[lo, hi]`` as {from=lo, to=hi}, or an explicit list of indices."""
    if value is None:
        return None
    if isinstance(value, dict):
        unknown = set(value) - {"from", "to"}
        if unknown or "from" not in value or "to" not in value:
            raise fail(where, value, "write a range as {from = 0, to = 15} (both ends included) "
                       "or a list of layer indices")
        lo, hi = value["from"], value["to"]
        if not (isinstance(lo, int) and isinstance(hi, int)) or lo < 0 or hi < lo:
            raise fail(where, value, "a range needs integers 0 <= from <= to")
        return tuple(range(lo, hi + 1))
    if isinstance(value, (list, tuple)) and value and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        return tuple(sorted(set(value)))
    raise fail(where, value, "give a list of non-negative layer indices or {from = a, to = b}")


def check_positive_int(where: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise fail(where, value, "it must be a positive integer")


def check_number(where: str, value: Any, interval: str) -> None:
    """``value`` is a finite real number (not a bool) inside ``interval``, written as ``"[0, 1)"``,
    ``"(0, 1]"``, ``"(0, inf)"`` or ``"[0, inf)"``; NaN and ±inf never pass."""
    lo_open, hi_open = interval[0] == "(", interval[-1] == ")"
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        if math.isinf(hi):
            raise fail(where, value, f"it must be a finite number {'>' if lo_open else '>='} {lo:g}")
        raise fail(where, value, f"it must be in {interval}")


def _check_name(where: str, value: Any) -> None:
    """Expert names become module-path components (``<site>.<name>.<i>``): an identifier that is not
    an attribute every module has (``weight``, ``bias``, ``forward``, ...)."""
    import torch

    if not isinstance(value, str) or not value.isidentifier() or len(value) > 64:
        raise fail(where, value, "an expert name must be an identifier of at most 64 characters "
                   "(letters, digits, '_'; it becomes part of parameter names)")
    if hasattr(torch.nn.Linear(1, 1, device="meta"), value):
        raise fail(where, value, "it collides with an attribute of torch modules", "choose another name")


# --------------------------------------------------------------------------------------------------
# Expert kinds
# --------------------------------------------------------------------------------------------------


def check_rule(rule: ExpertSpec) -> None:
    """The fields every expert kind has: its patterns, exclude, layers, optional and name."""
    where, patterns = f"expert.{rule.kind}", rule.patterns_field
    object.__setattr__(rule, patterns, _as_patterns(f"{where}.{patterns}", getattr(rule, patterns)))
    object.__setattr__(rule, "exclude", _as_patterns(f"{where}.exclude", rule.exclude, one_string=False))
    object.__setattr__(rule, "layers", _as_layers(f"{where}.layers", rule.layers))
    if not isinstance(rule.optional, bool):
        raise fail(f"{where}.optional", rule.optional, "it must be true or false")
    _check_name(f"{where}.name", rule.name)


class ExpertSpec:
    """The base of every expert kind's spec class.

    A kind's spec class is a frozen dataclass with the fields ``kind`` (``Literal`` of its TOML key,
    that key as default), its patterns (the field :attr:`patterns_field` names), ``layers``,
    ``exclude``, ``optional`` and ``name``, whose ``__post_init__`` calls :func:`check_rule`. The
    class attributes here are what the spec layer asks of a kind; how a kind finds its sites and
    inserts itself is its entry in :mod:`moa_fx.kinds`.
    """

    patterns_field: ClassVar[str] = "at"
    routable_per_site: ClassVar[bool] = False  # a per-site router (router.scope = 'site') may gate it

    @property
    def patterns(self) -> tuple[str, ...]:
        """The module-path patterns this rule places experts at."""
        return getattr(self, self.patterns_field)

    @property
    def expert_count(self) -> int:
        """How many experts this rule places at one site."""
        return 1


EXPERT_KINDS: dict[str, type[ExpertSpec]] = {}


def register_expert_spec(cls: type[ExpertSpec]) -> type[ExpertSpec]:
    """Make ``kind = "<key>"`` parse to ``cls`` (the key is the default of its ``kind`` field)."""
    if not (isinstance(cls, type) and issubclass(cls, ExpertSpec) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass derived from ExpertSpec")
    key = next(f.default for f in dataclasses.fields(cls) if f.name == "kind")
    taken = EXPERT_KINDS.get(key)
    if taken is not None and taken is not cls:
        raise SpecError(f"expert kind '{key}' is already {taken.__module__}.{taken.__qualname__}; choose another kind")
    EXPERT_KINDS[key] = cls
    return cls


@register_expert_spec
@dataclass(frozen=True)
class LoraExpert(ExpertSpec):
    """LoRA experts at linear projections: ``s·B(A(dropout(x)))`` with ``s = alpha / r``."""

    kind: Literal["lora"] = field(default="lora", metadata=help_text("expert kind"))
    at: tuple[str, ...] = field(default=("*.q_proj", "*.v_proj"), metadata=help_text(
        "module-path globs (or 're:<regex>') of the projections that get the experts"))
    r: int | tuple[int, ...] = field(default=8, metadata=help_text(
        "rank of each expert; a list gives one expert per rank (heterogeneous mixture)"))
    alpha: float = field(default=8.0, metadata=help_text("LoRA alpha; the scale is alpha / r per expert"))
    dropout: float = field(default=0.0, metadata=help_text(
        "dropout on the expert input, drawn independently in each expert (with share_a one mask for all, before the "
        "shared A); the router reads the undropped input"))
    count: int = field(default=1, metadata=help_text(
        "experts per site when r is one number (r is then shared by all of them)"))
    share_a: bool = field(default=False, metadata=help_text(
        "one shared A and one B per expert (HydraLoRA); needs equal ranks"))
    layers: tuple[int, ...] | None = field(default=None, metadata=help_text(
        "only these layer indices (list, or {from, to} both included); default: the spec's layers"))
    exclude: tuple[str, ...] = field(default=(), metadata=help_text("globs of module paths to leave out"))
    optional: bool = field(default=False, metadata=help_text(
        "allow patterns to match nothing (otherwise every pattern must match at least one module)"))
    name: str = field(default="lora", metadata=help_text("expert name used in parameter names and router stats"))

    routable_per_site: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_rule(self)
        ranks = self.r if isinstance(self.r, (list, tuple)) else (self.r,)
        if not ranks:
            raise fail("expert.lora.r", self.r, "give a positive rank or a non-empty list of ranks")
        for rank in ranks:
            check_positive_int("expert.lora.r", rank)
        check_positive_int("expert.lora.count", self.count)
        if isinstance(self.r, (list, tuple)):
            if self.count not in (1, len(ranks)):
                raise fail("expert.lora.count", self.count,
                           f"with a list of {len(ranks)} ranks, count must be 1 or {len(ranks)}",
                           "drop count: one expert is made per listed rank")
            object.__setattr__(self, "r", tuple(ranks))
        check_number("expert.lora.alpha", self.alpha, "(0, inf)")
        check_number("expert.lora.dropout", self.dropout, "[0, 1)")
        if 0 < self.dropout < 1e-12:  # the fused op's smallest rate (moa_fx.kernels.dropout_lora.MIN_RATE)
            raise fail("expert.lora.dropout", self.dropout, "a rate above 0 must be at least 1e-12; use 0 for no dropout")
        if self.share_a and len(set(self.ranks)) != 1:
            raise fail("expert.lora.share_a", self.share_a, "a shared A needs every expert to have the same rank")

    @property
    def ranks(self) -> tuple[int, ...]:
        """The rank of every expert this rule places at one site."""
        if isinstance(self.r, tuple):
            return self.r
        return (self.r,) * self.count

    @property
    def expert_count(self) -> int:
        return len(self.ranks)


@register_expert_spec
@dataclass(frozen=True)
class ParallelAdapterExpert(ExpertSpec):
    """A bottleneck adapter beside a whole module span: ``W_up·act(W_down·h + b_down) + b_up``."""

    kind: Literal["parallel_adapter"] = field(default="parallel_adapter", metadata=help_text("expert kind"))
    around: tuple[str, ...] = field(default=("*.mlp",), metadata=help_text(
        "module-path globs of the spans (module boundaries) the adapter runs beside"))
    bottleneck: int = field(default=16, metadata=help_text("bottleneck width"))
    activation: Literal["silu", "relu", "gelu"] = field(default="silu", metadata=help_text("bottleneck activation"))
    init_gain: float = field(default=1e-4, metadata=help_text("Xavier-uniform gain of both weights (biases start at 0)"))
    layers: tuple[int, ...] | None = field(default=None, metadata=help_text("only these layer indices"))
    exclude: tuple[str, ...] = field(default=(), metadata=help_text("globs of module paths to leave out"))
    optional: bool = field(default=False, metadata=help_text(
        "allow patterns to match nothing (otherwise every pattern must match at least one module)"))
    name: str = field(default="pa", metadata=help_text("expert name"))

    patterns_field: ClassVar[str] = "around"

    def __post_init__(self) -> None:
        check_rule(self)
        check_positive_int("expert.parallel_adapter.bottleneck", self.bottleneck)
        check_choices(self, "expert.parallel_adapter", "activation")
        check_number("expert.parallel_adapter.init_gain", self.init_gain, "(0, inf)")


@register_expert_spec
@dataclass(frozen=True)
class PromptExpert(ExpertSpec):
    """Prompt-tuning expert inside attention: L learned prompts attended by the query after RoPE."""

    kind: Literal["prompt"] = field(default="prompt", metadata=help_text("expert kind"))
    at: tuple[str, ...] = field(default=("*.self_attn",), metadata=help_text(
        "module-path globs of the attention modules (their attention op is found in the graph)"))
    length: int = field(default=10, metadata=help_text("number of prompt vectors L"))
    layers: tuple[int, ...] | None = field(default=None, metadata=help_text("only these layer indices"))
    exclude: tuple[str, ...] = field(default=(), metadata=help_text("globs of module paths to leave out"))
    optional: bool = field(default=False, metadata=help_text(
        "allow patterns to match nothing (otherwise every pattern must match at least one module)"))
    name: str = field(default="prompt", metadata=help_text("expert name"))

    def __post_init__(self) -> None:
        check_rule(self)
        check_positive_int("expert.prompt.length", self.length)




# --------------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThresholdSpec:
    """The per-token threshold τ of threshold selection."""

    learned: bool = field(default=False, metadata=help_text(
        "learn τ = max · sigmoid(W_t h + b_t) per token; otherwise τ = value, a constant"))
    value: float = field(default=0.5, metadata=help_text("the constant threshold when learned = false"))
    max: float | None = field(default=None, metadata=help_text(
        "τ_max of the learned threshold; default 1/E (AdaMoLE)"))
    rule: Literal["adamole", "moa"] = field(default="adamole", metadata=help_text(
        "'adamole': w = (g − τ)·sel (τ learns; renormalised as router.renormalize says); "
        "'moa': w = g·sel (τ gets no gradient)"))

    def __post_init__(self) -> None:
        check_choices(self, "router.threshold", "rule")
        if not isinstance(self.learned, bool):
            raise fail("router.threshold.learned", self.learned, "it must be true or false")
        check_number("router.threshold.value", self.value, "[0, 1]")
        if self.max is not None:
            check_number("router.threshold.max", self.max, "(0, 1]")


@dataclass(frozen=True)
class RouterSpec:
    """How the experts are gated: where the router sits, its form, the gate and the selection."""

    scope: str = field(default="none", metadata=help_text(
        "'none' (every expert weight 1), 'site' (one router per projection, AdaMoLE), or a block "
        "glob like 'model.layers.*' (one router per block for every expert inside it, MoA)"))
    input: Literal["normed", "raw"] = field(default="normed", metadata=help_text(
        "block routers read the block's normalised input (input_layernorm) or its raw input"))
    form: Literal["linear", "swiglu"] = field(default="linear", metadata=help_text(
        "router network: linear d→E, or SwiGLU with hidden E·hidden_multiplier"))
    hidden_multiplier: int = field(default=4, metadata=help_text("SwiGLU router hidden size is E times this"))
    bias: bool | None = field(default=None, metadata=help_text(
        "give the linear router a bias; default: true for block routers (MoA's native linear router), false per site"))
    gate: Literal["softmax", "sigmoid"] = field(default="softmax", metadata=help_text(
        "gate function on the router logits (softmax is computed in fp32)"))
    select: Literal["dense", "topk", "threshold"] = field(default="dense", metadata=help_text(
        "dense (every expert, weighted), top-k, or threshold (constant or learned)"))
    top_k: int = field(default=2, metadata=help_text("experts per token when select = 'topk'"))
    threshold: ThresholdSpec = field(default_factory=ThresholdSpec, metadata=help_text(
        "threshold settings when select = 'threshold'"))
    renormalize: bool | None = field(default=None, metadata=help_text(
        "divide the selected weights by their sum; default: true for softmax, false for sigmoid"))
    aux_loss_coef: float = field(default=0.0, metadata=help_text(
        "coefficient of the load-balancing loss E·Σ f_e·P_e added to the loss in training"))

    def __post_init__(self) -> None:
        if not isinstance(self.scope, str) or not self.scope:
            raise fail("router.scope", self.scope, "choose 'none', 'site' or a block glob like 'model.layers.*'")
        if self.scope not in ("none", "site", "@blocks"):
            check_pattern("router.scope", self.scope)
        check_choices(self, "router", "input", "form")
        check_positive_int("router.hidden_multiplier", self.hidden_multiplier)
        check_choices(self, "router", "gate", "select")
        check_positive_int("router.top_k", self.top_k)
        if isinstance(self.threshold, dict):
            object.__setattr__(self, "threshold", build_table(ThresholdSpec, self.threshold, "router.threshold"))
        if not isinstance(self.threshold, ThresholdSpec):
            raise fail("router.threshold", self.threshold, "give a table such as {learned = true}")
        check_number("router.aux_loss_coef", self.aux_loss_coef, "[0, inf)")
        if self.bias is not None and not isinstance(self.bias, bool):
            raise fail("router.bias", self.bias, "it must be true, false or left out")
        if self.renormalize is not None and not isinstance(self.renormalize, bool):
            raise fail("router.renormalize", self.renormalize, "it must be true, false or left out")
        if self.scope == "none" and self.select != "dense":
            raise fail("router.select", self.select, "without a router (scope = 'none') only 'dense' applies",
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

    experts: tuple[ExpertSpec, ...] = field(default=(), metadata=help_text("the expert rules, in order"))
    router: RouterSpec = field(default_factory=RouterSpec, metadata=help_text("how the experts are routed"))
    layers: tuple[int, ...] | None = field(default=None, metadata=help_text(
        "layer indices that get experts (list or {from, to}); default all"))
    name: str = field(default="custom", metadata=help_text("a name for this spec (shown by the CLI)"))
    description: str = field(default="", metadata=help_text("free text"))

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            object.__setattr__(self, "router", build_table(RouterSpec, self.router, "router"))
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
        if r.kind == "site" and any(not e.routable_per_site for e in experts):
            raise fail("router.scope", r.scope, "per-site routers gate LoRA experts only",
                       "use a block scope such as 'model.layers.*' for parallel adapters and prompts")
        if r.select == "topk" and r.kind == "site":
            for e in experts:
                if r.top_k > e.expert_count:
                    raise fail("router.top_k", r.top_k, f"expert '{e.name}' has only {e.expert_count} experts per "
                               f"site; top_k must be <= {e.expert_count}")


def _expert_from_any(value: Any, index: int) -> ExpertSpec:
    if isinstance(value, ExpertSpec):
        return value
    if not isinstance(value, dict):
        raise fail(f"experts[{index}]", value, "each expert is a table with a 'kind'")
    kind = value.get("kind")
    if kind not in EXPERT_KINDS:
        raise fail(f"experts[{index}].kind", kind, "choose one of " + ", ".join(repr(k) for k in EXPERT_KINDS))
    return build_table(EXPERT_KINDS[kind], value, f"experts[{index}] ({kind})")


# PEFT's names for our fields, so a PEFT user's guess gets a precise hint
_PEFT_NAMES = {"rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "at",
               "num_experts": "count", "layers_to_transform": "layers", "exclude_modules": "exclude",
               "top_k_experts": "top_k", "threshold_max": "max"}


def build_table(cls: type, data: dict, where: str) -> Any:
    """``cls(**data)`` after checking that ``data`` names only fields of ``cls``, each of a type its
    annotation allows (lists become tuples); ``where`` names the table in error messages."""
    if not isinstance(data, dict):
        raise fail(where, data, "expected a table")
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
