#!/usr/bin/env bash
# The device check, for a lent machine with an NVIDIA GPU (budget: 8 minutes on an H100; stages time out):
#   1. builds fdm_fast._C with its CUDA kernels in place (sm_90 only, for speed)
#   2. runs the GPU tests: the cuda and triton backends against the float64 reference, noise equality,
#      torch.compile(fullgraph) and CUDA-graph capture (the edm / fdm_edm cases, to fit the time)
#   3. runs benchmarks/ops_bandwidth.py and benchmarks/train_throughput.py (64x64 DDPM++, batch 64)
# Everything goes into OUTDIR: env.txt, build.log, tests.log, bench.log, train.log, ops.json, train.json, RESULTS_gpu.md
# (rows to append to benchmarks/RESULTS.md), summary.txt. A failed stage is recorded; the rest run.
#
#   bash benchmarks/gpu_check.sh "$OUT"          (GPU_CHECK_QUICK=1: a smaller run to dry-run the script)
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
quick=${GPU_CHECK_QUICK:-0}
summary="$out/summary.txt"
: > "$summary"

stage() {  # stage NAME TIMEOUT_S LOG CMD...
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s (log: $(basename "$log"))" | tee -a "$summary"
  tail -n 3 "$log" | sed 's/^/    /' | tee -a "$summary"
}

{ nvidia-smi || true
  $py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); \
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  command -v nvcc && nvcc --version | tail -n 2; } > "$out/env.txt" 2>&1
head -n 20 "$out/env.txt" | grep -E "torch|device|release" | tee -a "$summary"

stage build 180 "$out/build.log" env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 \
  FDM_FAST_EXT_REQUIRED=1 $py setup.py build_ext --inplace
$py -c "import fdm_fast.ops as o; print('backends on cuda:', o.available_backends('cuda'), '| cpu:', o.available_backends('cpu'))" \
  2>&1 | tee -a "$summary"

sel="edm"
[ "$quick" = "1" ] && sel="fdm_edm and shape0 and dtype0"
xdist=""
$py -c "import xdist" 2>/dev/null && [ "$quick" != "1" ] && xdist="-n 8"
stage tests 150 "$out/tests.log" $py -m pytest -q -p no:cacheprovider $xdist -k "$sel or gpu or cuda or graph or compile" \
  tests/test_noise.py tests/test_autograd_compile.py tests/test_extension.py tests/test_ops.py tests/test_sampling.py

bench=(--json "$out/ops.json" --results "$out/RESULTS_gpu.md" --ops perturb loss heun)
[ "$quick" = "1" ] && bench+=(--sizes b64 --dtypes fp32 --ops perturb --no-compile --reps 3)
stage bench 150 "$out/bench.log" $py benchmarks/ops_bandwidth.py "${bench[@]}"
train=(--json "$out/train.json" --results "$out/RESULTS_gpu.md")
[ "$quick" = "1" ] && train+=(--steps 2 --warmup 1 --no-compile)
stage train 120 "$out/train.log" $py benchmarks/train_throughput.py "${train[@]}"
echo "done" | tee -a "$summary"
