#!/usr/bin/env bash
# Every GPU row of PERF.md on the current library, in one call of the device tool (issue 20):
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
# Each part has its own time limit and writes its JSON and log under $OUT (or ./gpu-out), so a part
# that runs out of time costs only itself. Budget (H200, estimated, not yet run: about 8 minutes):
#   1. the CUDA kernel tests (Triton forward and backward against the torch references)   ~1.5 min
#   2. the fused ops alone: bandwidth at 1k-16k tokens, forward and backward               ~1 min
#   3. the training step, eager: floor, PEFT, per-expert loop, moa-fx unlowered / lowered   ~2 min
#   4. the training step, compiled and lowered, and the first compile (4 layers)           ~3 min
#   5. forward only (inference)                                                             ~0.5 min
# Versions and the device name go into every JSON (benchmarks/common.py's env_info).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.csv" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt"
python -m pip install -q -e . --no-deps 2>/dev/null || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

part() {  # part NAME SECONDS COMMAND...: run one part with its own limit, log to $OUT/NAME.log
  local name="$1" limit="$2"
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc $rc in $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
}

part tests 120 python -m pytest -q -x -p no:cacheprovider tests/test_kernels -k "triton or cuda"
part kernel 90 python benchmarks/bench_kernel.py --backward --json "$OUT/kernel_gpu.json"
part step_eager 150 python benchmarks/bench_step.py --methods sparse_moa adamole --no-compile \
  --warmup 2 --steps 6 --json "$OUT/step_gpu_eager.json"
part step_compiled 200 python benchmarks/bench_step.py --layers 4 --methods sparse_moa adamole --no-loop \
  --warmup 2 --steps 6 --variants floor floor.compiled "peft(r=8;q,k,v,o,down)" sparse_moa.lowered.compiled \
  "peft(r=32;q,k,v,o)" adamole.lowered.compiled --json "$OUT/step_gpu_compiled.json"
part inference 45 python benchmarks/bench_step.py --methods sparse_moa --no-compile --no-loop --inference \
  --warmup 2 --steps 6 --json "$OUT/inference_gpu.json"
ls -la "$OUT"
