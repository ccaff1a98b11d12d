"""Module-path patterns: globs, regular expressions and roles, and their precedence rank.

A pattern is a glob over module paths (``*.q_proj``; ``*`` also crosses dots), a regular
expression when prefixed ``re:`` (``re:model\\.layers\\.[0-3]\\.mlp``), or a *role* prefixed ``@``
that names a projection the same way on every architecture (``@q``, ``@k``, ``@v``, ``@o``,
``@gate``, ``@up``, ``@down``, ``@mlp``, ``@attn``); :data:`ROLES` lists the globs behind each.
:func:`match_rank` says whether a pattern matches a path and how specific the match is.
"""

from __future__ import annotations

import fnmatch
import functools
import re

from ..errors import SiteMatchError
from ..spec import check_pattern

__all__ = ["ROLES", "match_rank"]

# Projection roles: the same name on every architecture. Fused projections (GPT-2's c_attn,
# Phi-3's qkv_proj, NeoX's query_key_value) serve q, k and v at once: a rule naming all three
# places one expert there. The names behind each role:
#   LLaMA family: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
#   GPT-2 / StarCoder: attn.c_attn attn.c_proj mlp.c_fc mlp.c_proj     Phi-3: qkv_proj gate_up_proj
#   GPT-NeoX, BLOOM, Falcon: query_key_value dense dense_h_to_4h dense_4h_to_h
#   GPT-J, CodeGen: attn.q_proj attn.out_proj mlp.fc_in mlp.fc_out       OPT, Phi-2: out_proj/dense fc1 fc2
#   MPT: Wqkv out_proj ffn.up_proj ffn.down_proj   Baichuan: W_pack   InternLM2: wqkv wo w1 w3 w2
ROLES: dict[str, tuple[str, ...]] = {
    "q": ("*.q_proj", "*.attn.c_attn", "*.qkv_proj", "*.query_key_value", "*.Wqkv", "*.W_pack", "*.wqkv"),
    "k": ("*.k_proj", "*.attn.c_attn", "*.qkv_proj", "*.query_key_value", "*.Wqkv", "*.W_pack", "*.wqkv"),
    "v": ("*.v_proj", "*.attn.c_attn", "*.qkv_proj", "*.query_key_value", "*.Wqkv", "*.W_pack", "*.wqkv"),
    "o": ("*.o_proj", "*.attn.c_proj", "*.self_attn.out_proj", "*.attention.dense", "*.self_attention.dense",
          "*.self_attn.dense", "*.attn.out_proj", "*.attention.wo"),
    "gate": ("*.gate_proj", "*.gate_up_proj", "*.w1"),
    "up": ("*.up_proj", "*.gate_up_proj", "*.mlp.c_fc", "*.dense_h_to_4h", "*.fc1", "*.mlp.fc_in", "*.w3"),
    "down": ("*.down_proj", "*.mlp.c_proj", "*.dense_4h_to_h", "*.fc2", "*.mlp.fc_out", "*.w2"),
    "mlp": ("*.mlp", "*.feed_forward", "*.block_sparse_moe", "*.ffn"),
    "attn": ("*.self_attn", "*.attn", "*.attention", "*.self_attention"),
}


def _expand(pattern: str) -> list[tuple[str, int]]:
    """(glob-or-regex, rank) pairs; rank 3 = exact, 2 = glob/role, 1 = regex."""
    if pattern.startswith("@"):
        role = pattern[1:]
        if role not in ROLES:
            raise SiteMatchError(f"unknown role '{pattern}'; roles: " + ", ".join("@" + r for r in ROLES))
        return [(g, 2) for g in ROLES[role]]
    if pattern.startswith("re:"):
        return [(pattern, 1)]
    if any(ch in pattern for ch in "*?["):
        return [(pattern, 2)]
    return [(pattern, 3)]


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern:
    """A ``re:`` pattern compiled after :func:`~moa_fx.spec.check_pattern` found it safe to backtrack on."""
    return re.compile(check_pattern("pattern", pattern)[3:])


def match_rank(pattern: str, path: str) -> int:
    """0 if ``pattern`` does not match ``path``, else its precedence rank (higher wins)."""
    best = 0
    for pat, rank in _expand(pattern):
        if rank == 1:
            ok = _regex(pat).fullmatch(path) is not None
        elif rank == 2:
            ok = fnmatch.fnmatchcase(path, pat)
        else:
            ok = path == pat
        if ok:
            best = max(best, rank)
    return best
