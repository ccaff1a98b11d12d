"""Training checkpoints and the output directory's lock.

Checkpoint layout (``<out>/checkpoint/``), never a pickle:

- ``tensors-<step>.safetensors``: adapter weights (``adapter.<name>``), optimizer state tensors
  (``optim.<param name>.<key>``) and the RNG state (``rng.torch``);
- ``trainer_state.json``: step, config, loss history, evaluations, optimizer hyperparameters and
  the name of its tensors file. Both are written to a temporary file in the same directory and
  renamed into place; the JSON goes last, so a crash leaves the previous complete checkpoint
  (:func:`clean_temporaries` removes what a killed save left behind).

One run per output directory: :func:`run_lock`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import time
from typing import Any

import torch

from ..errors import CheckpointError, MoaFxError, RunLockedError
from ..fileio import atomic_write
from ..runtime import MoAModel
from .loop import trainable_parameters

__all__ = ["CHECKPOINT_DIR", "STATE_FILE", "LOCK_FILE", "save_checkpoint", "load_checkpoint", "clean_temporaries",
           "run_lock"]

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"


def save_checkpoint(directory: pathlib.Path, model: MoAModel, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> pathlib.Path:
    """Write the tensors file, then ``trainer_state.json`` naming it; drop older tensors files."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in trainable_parameters(model)}
    tensors: dict[str, torch.Tensor] = {f"adapter.{k}": v.detach().contiguous().cpu()
                                        for k, v in model.adapter_state_dict().items()}
    scalars: dict[str, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{names[id(p)]}.{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars.setdefault(names[id(p)], {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    step = state["step"]
    tensor_file = f"tensors-{step:08d}.safetensors"
    atomic_write(directory / tensor_file, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    full = {**state, "tensors": tensor_file, "param_names": [n for n, _ in trainable_parameters(model)],
            "optimizer": {"param_groups": hyper, "scalars": scalars}, "format": 1}
    text = json.dumps(full, indent=1, sort_keys=True)
    atomic_write(directory / STATE_FILE, lambda p: p.write_text(text))
    for old in directory.glob("tensors-*.safetensors"):
        if old.name != tensor_file:
            old.unlink(missing_ok=True)
    return directory


def load_checkpoint(directory: pathlib.Path, model: MoAModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore adapters, optimizer state and RNG state; return the saved trainer state."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state_path = directory / STATE_FILE
    if not state_path.exists():
        raise CheckpointError(f"no checkpoint in '{directory}' ({STATE_FILE} is missing); run without --resume "
                              "to start a new run")
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"'{state_path}' is damaged ({err}); delete the checkpoint directory to restart") from None
    tensor_path = directory / str(state.get("tensors", ""))
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"'{tensor_path}' is missing or damaged ({err}); the checkpoint cannot be resumed")
    own = model.adapter_state_dict()
    adapters = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
    if set(adapters) != set(own):
        raise CheckpointError(f"the checkpoint's adapters do not fit this model and spec "
                              f"({len(set(own) ^ set(adapters))} tensors differ)")
    model.adapters.load_state_dict(adapters, strict=True)
    params = dict(trainable_parameters(model))
    if state["param_names"] != list(params):
        raise CheckpointError("the checkpoint's trainable parameters differ from this model's")
    opt_state: dict[int, dict[str, Any]] = {}
    for i, name in enumerate(state["param_names"]):
        entry = {k[len(f"optim.{name}."):]: v for k, v in tensors.items() if k.startswith(f"optim.{name}.")}
        entry.update(state["optimizer"]["scalars"].get(name, {}))
        if entry:
            opt_state[i] = entry
    groups, start = [], 0
    for g, hyper in zip(optimizer.param_groups, state["optimizer"]["param_groups"]):
        groups.append({**hyper, "params": list(range(start, start + len(g["params"])))})
        start += len(g["params"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    return state


def clean_temporaries(directory: pathlib.Path) -> None:
    """Remove temporaries a killed save left behind (the last complete checkpoint is untouched)."""
    if not directory.is_dir():
        return
    for tmp in directory.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    try:
        current = json.loads((directory / STATE_FILE).read_text()).get("tensors")
    except (OSError, json.JSONDecodeError):
        return
    for old in directory.glob("tensors-*.safetensors"):
        if old.name != current:
            old.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# the output directory's lock
# --------------------------------------------------------------------------------------------------


LOCK_FILE = ".moa-fx-train.lock"


@contextlib.contextmanager
def run_lock(out: pathlib.Path):
    """Hold an exclusive ``fcntl.flock`` on ``<out>/.moa-fx-train.lock`` for the run: of two runs on one
    directory exactly one proceeds, and the kernel releases the lock when its process dies, so a
    killed run leaves nothing to clean up (its ``--resume`` simply takes the lock)."""
    import fcntl

    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    except OSError as err:
        raise MoaFxError(f"cannot create the lock file '{path}': {err.strerror}; choose a writable --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _locked(path) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)  # closing releases the lock


def _locked(path: pathlib.Path) -> RunLockedError:
    """The error for a lock another live process holds."""
    try:
        owner = json.loads(path.read_text())
        who = f" (pid {int(owner['pid'])} on {owner['host']})"
    except (OSError, ValueError, KeyError, TypeError):  # being written right now, or damaged
        who = ""
    return RunLockedError(f"'{path.parent}' is in use by another moa-fx train run{who}; wait for it to finish or "
                          "choose another --out")
