"""The training loop: checkpoints, exact resume, leftovers from a killed save, no pickles."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from moa_fx.cli.models import load_model
from moa_fx.errors import CheckpointError
from moa_fx.train import CHECKPOINT_DIR, STATE_FILE, TrainConfig, train

SMALL = dict(model="tiny-llama", spec="sparse_moa", steps=8, batch_size=8, lr=1e-2, warmup=2, compile=False,
             eval_every=4, save_every=4, eval_examples=16, log_every=2)




def run(out: pathlib.Path, **kw):
    cfg = TrainConfig(out=str(out), **{**SMALL, **kw})
    return train(cfg, load_model(cfg.model)[0])


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return out, run(out)
    finally:
        torch.set_num_threads(old)


def test_writes_adapter_and_checkpoint_without_pickles(full):
    out, result = full
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    state = json.loads((out / CHECKPOINT_DIR / STATE_FILE).read_text())
    assert state["step"] == 8 and len(state["losses"]) == 8 and len(state["evals"]) == 2
    files = sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir())
    assert files == ["tensors-00000008.safetensors", STATE_FILE]
    from safetensors.torch import load_file

    tensors = load_file(str(out / CHECKPOINT_DIR / files[0]))
    assert "rng.torch" in tensors and any(k.endswith(".exp_avg_sq") for k in tensors)
    assert result.router_stats and "accuracy" in result.evals[-1]


def test_resume_reaches_the_same_loss_curve(full, tmp_path):
    _, uninterrupted = full
    first = run(tmp_path, stop_after=4)
    assert first.stopped_early and first.steps == 4
    assert not (tmp_path / "adapter").exists()
    resumed = run(tmp_path, resume=True)
    assert resumed.losses == uninterrupted.losses  # bit-for-bit on CPU
    assert resumed.evals == uninterrupted.evals


def test_leftover_temporaries_do_not_break_resume(full, tmp_path):
    _, uninterrupted = full
    run(tmp_path, stop_after=4)
    ckpt = tmp_path / CHECKPOINT_DIR
    # what a save killed halfway leaves: a half-written tensors temp file and a newer, orphaned tensors file
    (ckpt / ".tensors-00000006.safetensors.abc123.tmp").write_bytes(b"\x00" * 100)
    (ckpt / f".{STATE_FILE}.xyz.tmp").write_text("{")
    (ckpt / "tensors-00000006.safetensors").write_bytes(b"garbage")
    resumed = run(tmp_path, resume=True)
    assert resumed.losses == uninterrupted.losses
    assert not list(ckpt.glob(".*.tmp"))


def test_resume_refuses_a_different_run(tmp_path):
    run(tmp_path, stop_after=2, steps=4)
    with pytest.raises(CheckpointError, match="lr"):
        run(tmp_path, steps=4, resume=True, lr=5e-3)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        run(tmp_path, steps=4)


def test_loss_goes_down_on_the_digit_tasks(tmp_path):
    result = run(tmp_path, model="small-llama", steps=40, batch_size=16, eval_every=40, save_every=40,
                 lr=1e-2, warmup=5)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.1, (first, last)
