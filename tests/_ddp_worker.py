"""Train a transformed tiny model for a few steps, in one process or under torchrun; write the losses as JSON.

Used by tests/test_ecosystem.py::test_ddp_matches_one_process. Every run sees the same global batch per
step (drawn from a generator seeded by the step); under torchrun each rank takes its slice of it, so DDP's
gradient average equals the one-process gradient of the whole batch.

    torchrun --standalone --nproc_per_node 2 tests/_ddp_worker.py --out runs.json \
        --runs ddp:lora,ddp:sparse_moa,strict:sparse_moa,fsdp:lora,fsdp:sparse_moa

Each run is ``WRAP:SPEC``: ``ddp`` wraps the model in DistributedDataParallel, with
``find_unused_parameters=True`` where the spec has parameters that get no gradient (sparse_moa's
threshold); ``strict`` is DDP without it (the error it raises is recorded); ``fsdp`` applies FSDP2's
``fully_shard``; ``none`` is one process (also importable: :func:`run`). Losses, or the error, go to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny import tiny_model  # noqa: E402

from moa_fx import transform  # noqa: E402

GLOBAL_BATCH, SEQ, STEPS, LR = 8, 12, 4, 5e-2
NO_GRAD_PARAMS = {"sparse_moa"}  # specs whose learned threshold gets no gradient (see presets.sparse_moa)


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 128, (GLOBAL_BATCH, SEQ), generator=g)


def run(spec: str, wrap: str, find_unused: bool) -> list[float]:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    base = tiny_model("llama", init=0.2)
    torch.manual_seed(0)  # the same adapter init on every rank (DDP broadcasts rank 0's anyway)
    moa = transform(base, spec)
    moa.train()
    model = moa
    if wrap == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(moa, find_unused_parameters=find_unused)
    elif wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from torch.distributed.tensor import DTensor

        model = fully_shard(moa)
        if not all(isinstance(p, DTensor) for p in model.parameters()):
            raise AssertionError("fully_shard left parameters unsharded")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        ids = batch(step)[rank * per_rank:(rank + 1) * per_rank]
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        report = loss.detach().clone()
        if world > 1:
            dist.all_reduce(report)
            report /= world
        losses.append(float(report))
    return losses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="ddp:lora,ddp:sparse_moa,strict:sparse_moa,fsdp:lora,fsdp:sparse_moa")
    args = ap.parse_args()
    torch.set_num_threads(1)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    result: dict = {"world_size": dist.get_world_size() if distributed else 1, "losses": {}, "errors": {}}
    for item in args.runs.split(","):
        wrap, spec = item.split(":")
        try:
            losses = run(spec, "ddp" if wrap == "strict" else wrap,
                         find_unused=wrap == "ddp" and spec in NO_GRAD_PARAMS)
            result["losses"][item] = losses
        except Exception as err:  # noqa: BLE001 - reported to the test, which decides
            result["errors"][item] = f"{type(err).__name__}: {err}"[:3000]
            if wrap != "strict":
                result.setdefault("tracebacks", {})[item] = traceback.format_exc()[-4000:]
            if distributed:  # a failed collective can leave the ranks out of step: start the next run together
                dist.barrier()
    if not distributed or dist.get_rank() == 0:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
