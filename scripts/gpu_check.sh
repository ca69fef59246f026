#!/usr/bin/env bash
# Build torchkiln from source on a GPU machine (no internet: uses the torch,
# scikit-build-core, pybind11, cmake and ninja already installed), run the
# CUDA tests and the GPU benchmarks, and leave a log plus JSON in OUTDIR.
#   bash scripts/gpu_check.sh OUTDIR
# Budget: under 9 minutes on a 16-core H200 machine, build included
# (TESTS_CAP / BENCH_CAP seconds cap those two stages; BENCH_ARGS adds e.g.
# "--family attention").
set -uo pipefail
out=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
exec > >(tee "$out/gpu_check.log") 2>&1
py=${PYTHON:-python3}
status=0
start=$SECONDS
step() { echo; echo "=== [$((SECONDS - start))s] $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"

step "build (sm_90 only, all cores)"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export TORCHKILN_CUDA=on
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
if ! "$py" -m pip install --no-index --no-build-isolation --no-deps -v . \
    --config-settings=build-dir="$root/build/gpu" > "$out/build.log" 2>&1; then
  tail -n 60 "$out/build.log"
  echo "BUILD FAILED"
  exit 1
fi
tail -n 3 "$out/build.log"
(cd /tmp && "$py" -m torchkiln info --json) > "$out/info.json" && cat "$out/info.json"

# Each stage has its own time cap so one slow stage cannot starve the next;
# results stream into $out as they come (the device tool returns $out even
# when its own limit cuts the command).
step "CUDA tests (8 workers, ${TESTS_CAP:=240}s cap, 150s per test)"
timeout "$TESTS_CAP" "$py" -m pytest tests -m cuda -q -p no:cacheprovider -n 8 --timeout 150 -rfE --tb=short \
  --junitxml="$out/cuda_tests.xml" || status=1

step "GPU benchmarks (${BENCH_CAP:=240}s cap)"
(cd /tmp && PYTHONUNBUFFERED=1 timeout "$BENCH_CAP" "$py" -m torchkiln bench --device cuda --progress \
  --repeat 20 --warmup 5 --json "$out/bench_cuda.json" ${BENCH_ARGS:-}) || status=1

step "done in $((SECONDS - start))s, status $status"
exit $status
