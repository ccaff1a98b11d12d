"""A run's state between steps, so a run that is cut off (a session ends, the machine stops) resumes
at its last saved step instead of from scratch.

Saved every ``EvalConfig.save_every`` steps, atomically, beside the results file
(``<results stem>.partial/<run>.pt``): the adapters' state dict (the trainable state), the optimizer's,
the CPU (and CUDA) random state that the dropout seeds are drawn from, and the losses, step times and
learning-curve points so far. A resumed run continues the same batches, learning rates and random
draws, so its result equals an uninterrupted run's. The file is keyed by the run and the run fields of
the config; one made under other settings is not resumed but replaced (and the log says so). The
results file's writer removes it once the run is recorded.
"""

from __future__ import annotations

import hashlib
import pathlib
import re
from typing import Any

import torch

from moa_fx.errors import InputError
from moa_fx.fileio import atomic_write

__all__ = ["partial_path", "save_partial", "load_partial"]


def partial_path(results: pathlib.Path, job: dict[str, Any]) -> pathlib.Path:
    """Where run ``job`` (method, setting, seed, lr) keeps its state beside the results file."""
    name = f"{job['method']}__{job['setting']}__seed{job['seed']}__lr{job['lr']:g}"
    # readable but bounded (a mixture's setting names every task), and unique: the hash of the exact name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:12]
    readable = re.sub(r"[^A-Za-z0-9_.+=-]", "-", name)[:120]
    return results.parent / f"{results.stem}.partial" / f"{readable}__{digest}.pt"


def save_partial(path: pathlib.Path, key: dict[str, Any], step: int, adapters: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, done: dict[str, Any]) -> None:
    """Write the state after ``step`` (``done``: the losses, step times, curve and seconds so far)."""
    state = {"key": key, "step": step, "adapters": adapters.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": torch.get_rng_state(), "done": done,
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: torch.save(state, p))


def load_partial(path: pathlib.Path, key: dict[str, Any], adapters: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, log) -> tuple[int, dict[str, Any]]:
    """Restore the saved state into ``adapters``, ``optimizer`` and the random state; returns (the step
    reached, what was done). (0, {}) when there is none, or when it cannot be used (logged)."""
    if not path.exists():
        return 0, {}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a torn or foreign file: start over, and say so
        log(f"  {path.name}: not a readable run state ({type(err).__name__}); starting this run over")
        return 0, {}
    if state.get("key") != key:
        log(f"  {path.name}: saved under other settings; starting this run over")
        return 0, {}
    try:  # the same key but another library version's adapters or optimizer layout
        adapters.load_state_dict(state["adapters"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:  # the adapters may be half-loaded now: stop the run
        raise InputError(f"{path} does not fit this run's adapters or optimizer ({type(err).__name__}: "
                         f"{str(err)[:200]}); delete it to start this run over") from None
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    log(f"  {path.name}: resumed after step {state['step']}")
    return int(state["step"]), state["done"]
