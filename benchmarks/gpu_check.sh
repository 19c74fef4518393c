#!/usr/bin/env bash
# The device check, for a lent machine with an NVIDIA GPU (budget: 8 minutes on an H100; stages time out):
#   1. builds fdm_fast._C with its CUDA kernels in place (sm_90 only, for speed)
#   2. runs the GPU tests: the cuda and triton backends against the float64 reference, noise equality,
#      torch.compile(fullgraph), CUDA-graph capture of every sampler (the edm / fdm_edm cases, to fit
#      the time), the layout property test and torch.library.opcheck of every op on CUDA
#   3. benchmarks/sync_check.py: ten training steps and every sampler under
#      torch.cuda.set_sync_debug_mode("error")
#   4. benchmarks: ops_bandwidth.py (every op, fp32 and bf16, 64x3x64x64 and 256x3x64x64, fraction of the
#      measured copy bandwidth), train_throughput.py ablation rows at 32x32 (CIFAR-10 config, batch 128,
#      no compile rows, to fit the time) and 64x64 (FFHQ config, batch 64), sampler_speed.py
#      (64x64 DDPM++, batch 64, NFE 35)
# Stage limits sum to 565 s (quick mode: about 2 minutes).
# Logs (env, build, tests, bench, train, sampler), JSON and RESULTS_gpu.md (rows to append to
# benchmarks/RESULTS.md) end up in OUTDIR/gpu_check.tar.gz, packed again after every stage so that a run
# cut short still returns what it measured. A failed stage is recorded and the rest run, except after a
# failed build, which ends the check at once (the device minutes are kept for a rerun).
#
#   bash benchmarks/gpu_check.sh "$OUT"          (GPU_CHECK_QUICK=1: a smaller run to dry-run the script)
set -uo pipefail
top=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
# The device tool returns at most 8 files: everything is written under OUTDIR/all, then packed into
# OUTDIR/gpu_check.tar.gz beside copies of summary.txt, RESULTS_gpu.md and sampler_speed.png.
out="$top/all"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the benchmarks import fdm_fast from this checkout
py=${PYTHON:-python3}
quick=${GPU_CHECK_QUICK:-0}
summary="$out/summary.txt"
: > "$summary"

pack() {  # everything so far, in at most 4 files (the device tool returns 8)
  tar -czf "$top/gpu_check.tar.gz" -C "$top" all
  for f in summary.txt RESULTS_gpu.md sampler/sampler_speed.png; do [ -f "$out/$f" ] && cp "$out/$f" "$top/"; done
}

stage() {  # stage NAME TIMEOUT_S LOG CMD...
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $(( $(date +%s) - t0 )) s (log: $(basename "$log"))" | tee -a "$summary"
  tail -n 3 "$log" | sed 's/^/    /' | tee -a "$summary"
  pack
  return $rc
}

{ nvidia-smi || true
  $py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); \
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  command -v nvcc && nvcc --version | tail -n 2; } > "$out/env.txt" 2>&1
head -n 20 "$out/env.txt" | grep -E "torch|device|release" | tee -a "$summary"

stage build 110 "$out/build.log" env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 \
  FDM_FAST_EXT_REQUIRED=1 $py setup.py build_ext --inplace \
  || { echo "build failed: check stopped" | tee -a "$summary"; grep -m 20 -E "error|Error" "$out/build.log" \
       | tee -a "$summary"; pack; exit 1; }
$py -c "import fdm_fast.ops as o; print('backends on cuda:', o.available_backends('cuda'), '| cpu:', o.available_backends('cpu'))" \
  2>&1 | tee -a "$summary"

sel="edm"
[ "$quick" = "1" ] && sel="fdm_edm and shape0 and dtype0"
xdist=""
$py -c "import xdist" 2>/dev/null && [ "$quick" != "1" ] && xdist="-n 8"
stage tests 75 "$out/tests.log" $py -m pytest -q -p no:cacheprovider $xdist -k "$sel or gpu or cuda or graph or compile" \
  tests/test_noise.py tests/test_autograd_compile.py tests/test_extension.py tests/test_ops.py tests/test_sampling.py
layout_cases=12
[ "$quick" = "1" ] && layout_cases=3
stage layouts 40 "$out/layouts.log" env FDM_FAST_LAYOUT_CASES=$layout_cases $py -m pytest -q -p no:cacheprovider \
  tests/test_layouts.py tests/test_opcheck.py tests/test_sync_free.py
sync=(--steps 10)
[ "$quick" = "1" ] && sync=(--steps 3 --warmup 2)
stage sync 40 "$out/sync.log" $py benchmarks/sync_check.py "${sync[@]}"

bench=(--json "$out/ops.json" --results "$out/RESULTS_gpu.md" --sizes b64 ffhq64 --dtypes fp32 bf16
       --ops perturb loss churn euler heun)
[ "$quick" = "1" ] && bench=(--json "$out/ops.json" --results "$out/RESULTS_gpu.md" --sizes b64 --dtypes fp32 --ops perturb
                              --no-compile --reps 3)
stage bench 90 "$out/bench.log" $py benchmarks/ops_bandwidth.py "${bench[@]}"
if [ "$quick" = "1" ]; then
  stage train 60 "$out/train.log" $py benchmarks/train_throughput.py --json "$out/train.json" \
    --results "$out/RESULTS_gpu.md" --preset digits --steps 2 --warmup 1 --no-compile
else
  stage train_cifar 55 "$out/train_cifar.log" $py benchmarks/train_throughput.py --json "$out/train_cifar.json" \
    --results "$out/RESULTS_gpu.md" --preset cifar --batch 128 --steps 10 --warmup 2 --no-compile
  stage train_ffhq 110 "$out/train_ffhq.log" $py benchmarks/train_throughput.py --json "$out/train_ffhq.json" \
    --results "$out/RESULTS_gpu.md" --preset ffhq64 --batch 64 --steps 10 --warmup 2
fi
sampler=(--out "$out/sampler" --results "$out/RESULTS_gpu.md" --batch 64 --speed-nfe 35 --nfe 13 35 --nfe-samples 500)
[ "$quick" = "1" ] && sampler=(--out "$out/sampler" --results "$out/RESULTS_gpu.md" --speed-nfe 3 --nfe 5 --nfe-samples 50 --reps 1)
stage sampler 45 "$out/sampler.log" $py benchmarks/sampler_speed.py "${sampler[@]}"
echo "done" | tee -a "$summary"
pack
rm -rf "$out"
