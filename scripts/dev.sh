#!/usr/bin/env bash
# One entry point for developers and CI:
#   scripts/dev.sh bench [torchkiln bench args]   build, then `torchkiln bench`
#   scripts/dev.sh test  [pytest args]            build, then the test suite
#   scripts/dev.sh install                        build only
# Creates the venv on first use and installs torch plus build/test tools.
# Environment:
#   TORCHKILN_VENV   venv directory              (default: .venv in the checkout)
#   TORCHKILN_TORCH  torch requirement            (default: torch==2.13.0, the CPU build)
#   TORCHKILN_CUDA   auto | on | off              (default: auto)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${TORCHKILN_VENV:-$root/.venv}
torch_spec=${TORCHKILN_TORCH:-torch==2.13.0}
task=${1:-install}
[ $# -gt 0 ] && shift

bash "$root/scripts/make_venv.sh" "$venv" "$torch_spec"
if [ -z "${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
# --no-build-isolation: compile against the torch in this venv, not a fresh one.
# A build directory per venv keeps rebuilds incremental and variants apart.
"$venv/bin/python" -m pip install -q --no-build-isolation --no-deps "$root" \
  --config-settings=build-dir="$root/build/$(basename "$venv")"

case "$task" in
  install) ;;
  test) cd "$root" && exec "$venv/bin/python" -m pytest "$@" ;;
  bench) exec "$venv/bin/torchkiln" bench "$@" ;;
  *) echo "usage: $0 {install|test|bench} [args...]" >&2; exit 2 ;;
esac
