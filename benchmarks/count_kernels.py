"""What the first compile of one training step (forward + backward) costs: its distinct Inductor
kernels and ATen nodes, counted (a count does not depend on what else the machine runs), and its
time by phase.

Each variant runs in a fresh subprocess with an empty Inductor cache directory (FX-graph and
autograd caches off, as for every cold compile here); after one compiled step, the kernels Inductor
compiled are its C++ (CPU) or Triton (CUDA) sources written to that directory, one file per distinct
source. The count is those files. Each row also has the ATen ops of the forward and backward graphs
(counted in a second, uncompiled pass), and the first step's seconds (compile + one step: a
time, so only with nothing else running) and the compile phases over 0.5 s that
``torch._dynamo.utils.compile_times`` records.

Variants: ``floor`` (the base model's step, as bench_step's ``floor.compiled``) and
``<method>`` (``transform(base, method)`` lowered, then torch.compile; its train step: each decoder
block a compile region, compiled once), ``<method>.flat`` (``compile_regions=False``: one flat graph)
and ``<method>.unmemoized`` (regions, but torch derives each region's schema at every call, as without
``moa_fx/region_schema.py``: the A/B of that memo).

    python benchmarks/count_kernels.py --layers 2 --methods adamole sparse_moa \
        --json benchmarks/results/kernels_cpu_2l.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

def kernel_files(cache: pathlib.Path, device: str) -> list[pathlib.Path]:
    """The kernel sources Inductor wrote under ``cache``: CPU ``.cpp`` files but for its instruction-set
    probes (``*_chk_kernel``); on CUDA the ``.py`` files holding a ``@triton.jit`` kernel (not the
    graphs' Python wrappers)."""
    files = [p for p in cache.rglob("*") if p.is_file()]
    if device == "cpu":
        return sorted(p for p in files if p.suffix == ".cpp" and "_chk_kernel" not in p.read_text(errors="replace"))
    return sorted(p for p in files if p.suffix == ".py" and "@triton.jit" in p.read_text(errors="replace"))


def _step(variant: str, base, ids, backend):
    """The variant's training step, its model compiled with ``backend``."""
    import torch

    if variant == "floor":
        compiled = torch.compile(base, backend=backend, dynamic=False)
        step = common.floor_step(base, ids)
        return lambda: step(compiled)
    method, _, suffix = variant.partition(".")  # "<method>.flat": compile_regions=False
    if suffix == "unmemoized":  # torch's region schema re-derived at every call, as without moa_fx.region_schema
        from moa_fx import region_schema

        region_schema.install = lambda: False
    moa, _ = common.make_moa(base, method, "auto", regions=suffix != "flat")
    moa.train()
    params = [p for p in moa.parameters() if p.requires_grad]
    return common.train_step(torch.compile(moa, backend=backend, dynamic=False), ids, params)


def aten_nodes(variant: str, base, ids) -> dict[str, int]:
    """The ATen ops (``call_function`` nodes) of the forward and backward graphs AOTAutograd hands a
    compiler, counted through a backend that runs them eagerly (no Inductor)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    counts = {"forward": 0, "backward": 0}

    def counting(name):
        def compiler(gm, _inputs):
            counts[name] += sum(1 for n in gm.graph.nodes if n.op == "call_function")
            return make_boxed_func(gm.forward)
        return compiler

    _step(variant, base, ids, aot_autograd(fw_compiler=counting("forward"), bw_compiler=counting("backward")))()
    return counts


def run_one(args, variant: str) -> dict:
    """One variant in this process: build, compile, one train step, count (then the ATen nodes, with
    dynamo reset, so that the timed compile was the first)."""
    import torch

    device = common.setup_process(args.threads)
    cache = pathlib.Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    shape = common.default_shape(device, args.layers, args.batch, args.seq)
    base = common.build_base(shape, device, seed=0)
    ids = common.make_inputs(shape, device)
    run = _step(variant, base, ids, "inductor")
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    files = kernel_files(cache, device)
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    phases = {n: round(float(v), 2) for n, v in zip(names, values) if float(v) >= 0.5}
    torch._dynamo.reset()
    return {"variant": variant, "kernels": len(files), "first_step_s": round(seconds, 1), "phases_s": phases,
            "aten_nodes": aten_nodes(variant, base, ids), "shape": shape.describe(),
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="*", default=["adamole"])
    p.add_argument("--json", default=None, help="write the results here (atomically)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args, args.one)))
        return {}
    rows = []
    for variant in ["floor", *args.methods]:
        cmd = [sys.executable, __file__, "--one", variant, "--layers", str(args.layers), "--batch", str(args.batch),
               "--seq", str(args.seq), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{out.stderr[-4000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{variant:12s} {r['kernels']:4d} kernels  {sum(r['aten_nodes'].values()):5d} ATen nodes  "
              f"(first step {r['first_step_s']} s)", flush=True)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    payload = {"rows": rows, "env": common.env_info(device), "command": " ".join(sys.argv)}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
