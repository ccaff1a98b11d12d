"""A transformed model in the tools people train with: the Hugging Face Trainer (checkpoints and
resume included), a plain loop, DDP and FSDP2 under torchrun (gloo, CPU), and bf16 autocast.

The torchrun runs live in ``tests/_ddp_worker.py``; the test compares their losses with one process
that sees the same global batch.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from moa_fx import transform
from tiny import tiny_model, tokens

HERE = pathlib.Path(__file__).parent




# --------------------------------------------------------------------------------------------------
# Hugging Face Trainer
# --------------------------------------------------------------------------------------------------


def dataset(n: int = 32) -> list[dict[str, torch.Tensor]]:
    """Two sequences, each repeated: something a few steps can fit, so the loss visibly goes down."""
    rows = tokens(2, 12, seed=5)
    return [{"input_ids": rows[i % 2], "attention_mask": torch.ones(12, dtype=torch.long), "labels": rows[i % 2]}
            for i in range(n)]


def trainer(moa, out: pathlib.Path, **overrides):
    from transformers import Trainer, TrainingArguments

    kw = dict(output_dir=str(out), max_steps=6, save_steps=3, per_device_train_batch_size=4, use_cpu=True,
              report_to=[], logging_steps=1, learning_rate=2e-2, lr_scheduler_type="constant", seed=0,
              dataloader_num_workers=0, disable_tqdm=True,
              # the Trainer keeps only the columns named in forward's signature; MoAModel.forward takes
              # **kwargs, so without this input_ids is dropped (test_trainer_default_columns)
              remove_unused_columns=False)
    kw.update(overrides)
    return Trainer(model=moa, args=TrainingArguments(**kw), train_dataset=dataset())


def fresh(spec: str = "adamole", family: str = "llama"):
    model = tiny_model(family, init=0.2)
    torch.manual_seed(0)
    return transform(model, spec)


def adapter_tensors(moa) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in moa.adapter_state_dict().items()}


def step_losses(tr) -> list[float]:
    return [h["loss"] for h in tr.state.log_history if "loss" in h]


def test_trainer_trains_saves_and_resumes_exactly(tmp_path):
    moa = fresh()
    tr = trainer(moa, tmp_path / "full")
    tr.train()
    full = step_losses(tr)
    assert len(full) == 6 and full[-1] < full[0], full
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    want = adapter_tensors(moa)

    again = fresh()
    tr2 = trainer(again, tmp_path / "resumed")
    tr2.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    resumed = step_losses(tr2)  # the checkpoint's log history (steps 1..3), then steps 4..6
    assert resumed == full  # bit for bit (CPU, the RNG state is restored)
    got = adapter_tensors(again)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_trainer_checkpoint_holds_adapters_only_and_handles_tied_weights(tmp_path):
    from safetensors.torch import load_file

    moa = fresh("lora", "gpt2")
    tr = trainer(moa, tmp_path, max_steps=3)
    tr.train()
    saved = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    assert set(saved) == {f"moa.{k}" for k in moa.adapter_state_dict()}


def test_trainer_default_columns(tmp_path):
    tr = trainer(fresh(), tmp_path, max_steps=1, save_steps=10, remove_unused_columns=True)
    tr.train()


def test_plain_loop_loss_goes_down():
    moa = fresh("sparse_moa")
    moa.train()
    rows = torch.stack([d["input_ids"] for d in dataset(4)])
    opt = torch.optim.AdamW([p for p in moa.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(6):
        loss = moa(input_ids=rows, labels=rows).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses


# --------------------------------------------------------------------------------------------------
# DDP and FSDP2 (torchrun, gloo on CPU)
# --------------------------------------------------------------------------------------------------

# what torchrun prints when the machine, not moa-fx, is the problem
ENVIRONMENT_FAILURES = ("Address already in use", "Connection refused", "Network is unreachable",
                        "No such device", "gloo", "Rendezvous", "rendezvous", "Socket Timeout",
                        "Could not resolve hostname", "No module named torch.distributed.run")


@pytest.mark.slow
def test_ddp_and_fsdp2_match_one_process(tmp_path):
    sys.path.insert(0, str(HERE))
    import _ddp_worker

    out = tmp_path / "runs.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get(
        "PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(HERE / "_ddp_worker.py"), "--out", str(out)],
                              capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired:
        pytest.skip("torchrun did not finish in 240 s on this machine")
    log = proc.stdout + proc.stderr
    if not out.exists():
        if any(marker in log for marker in ENVIRONMENT_FAILURES):
            pytest.skip(f"torchrun could not start 2 gloo processes here: {log[-500:]}")
        pytest.fail(f"torchrun failed (exit {proc.returncode}):\n{log[-4000:]}")
    runs = json.loads(out.read_text())
    assert runs["world_size"] == 2
    failed = {k: v for k, v in runs["errors"].items() if not k.startswith("strict:")}
    assert not failed, runs.get("tracebacks")
    for spec in ("lora", "sparse_moa"):
        single = _ddp_worker.run(spec, "none", find_unused=False)
        for wrap in ("ddp", "fsdp"):
            # fp32 sums in another order (two half-batches, then an all-reduce)
            torch.testing.assert_close(runs["losses"][f"{wrap}:{spec}"], single, rtol=1e-5, atol=1e-5,
                                       msg=f"{wrap} {spec}")
    # sparse_moa's learned threshold gets no gradient (official rule): DDP needs find_unused_parameters=True
    assert "find_unused_parameters=True" in runs["errors"]["strict:sparse_moa"]


# --------------------------------------------------------------------------------------------------
# bf16 autocast
# --------------------------------------------------------------------------------------------------

# bf16 is judged against what the experts do, not against the loss: with small adapters the experts
# move a 2-layer model's loss by ~0.2%, so a bound of 2% of the loss would pass with every expert
# dropped. Here the adapters move the loss by 2-4% and the logits by O(1); autocast must stay within a
# quarter of that effect (measured: bf16 is 0.5-12% of the loss effect and 2-10% of the logits'
# effect; a run without experts is ~100% of it).
BF16_OF_EFFECT = 0.25


def _rms(t: torch.Tensor) -> float:
    return float(t.float().pow(2).mean().sqrt())


@pytest.mark.parametrize("spec", ["adamole", "sparse_moa"])
def test_bf16_autocast_close_to_fp32(spec):
    from tiny import randomize_adapters

    moa = fresh(spec)
    randomize_adapters(moa, std=0.2)
    moa.eval()  # no dropout: the two runs see the same function
    ids = tokens(4, 16, seed=9)
    with torch.no_grad():
        want = moa(input_ids=ids, labels=ids)
        with moa.disable_adapter():
            base = moa(input_ids=ids, labels=ids)
    # the loss is what training sees; the logits too, since the loss averages effects that can cancel
    loss_effect = abs(float(want.loss) - float(base.loss))
    logits_effect = _rms(want.logits - base.logits)
    assert loss_effect > 0.01 * float(want.loss), "the experts barely move the loss: the bound would prove nothing"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moa(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    loss_error = abs(float(out.loss) - float(want.loss))
    assert loss_error < BF16_OF_EFFECT * loss_effect, (loss_error, loss_effect)
    logits_error = _rms(out.logits.float() - want.logits)
    assert logits_error < BF16_OF_EFFECT * logits_effect, (logits_error, logits_effect)
    out.loss.backward()
    grads = [p.grad for p in moa.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
