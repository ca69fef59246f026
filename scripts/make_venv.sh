#!/usr/bin/env bash
# Create (or reuse) a virtual environment with one torch build plus everything
# torchkiln needs to build, test and benchmark.
#   scripts/make_venv.sh VENV_DIR TORCH_SPEC      e.g. ~/.cache/torchkiln/venv-cpu torch==2.13.0
# Idempotent: an existing venv whose torch already matches is only topped up.
set -euo pipefail
venv=$1
torch_spec=$2
py=${PYTHON:-python3}

# This machine's pip config lists local package folders; pip warns once per
# package that a folder lacks. Those lines say nothing about our install.
pip_install() {
  "$venv/bin/python" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location '" >&2)
}

if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
pip_install --upgrade pip >/dev/null
pip_install "$torch_spec"
pip_install \
  "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.22" ninja \
  numpy safetensors pytest pytest-benchmark pytest-xdist hypothesis matplotlib
"$venv/bin/python" -c "import torch; print('venv', '$venv', 'torch', torch.__version__, 'cuda', torch.version.cuda)"
