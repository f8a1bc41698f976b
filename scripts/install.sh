#!/usr/bin/env bash
# Installs fairchem-dens and its whole stack into a virtual environment (default: .venv).
#
#   step 1: fairchem-core==1.10.0 and friends (pulls torch~=2.4 from the registry, ~6 GB)
#   step 2: torch-scatter, torch-sparse and torch-cluster, built from source against that torch
#           (fairchem imports every model file at start-up and fails without the first two;
#           torch-cluster gives `radius_graph` for `use_pbc: false`, with torch-geometric 2.6:
#           from 2.7 torch-geometric wants pyg-lib for it, which no registry here serves)
#   step 3: this package, editable, with the dev extra (pytest, ruff), plus the data tools:
#           tblite (GFN2-xTB labels of the molecular data), rdkit (starting geometries) and
#           ase-db-backends (the `.aselmdb` files of fairchem's `ase_db` format)
#
# Idempotent: a complete environment is detected and left alone. Measured here: about 2 min for
# step 1 and 15-25 min for step 2 on a fresh 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x "$VENV/bin/python" ]; then
    echo "[install] creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q -U pip setuptools wheel

if ! "$VENV/bin/python" -c "import fairchem.core, e3nn, lmdb, submitit, ase" 2>/dev/null; then
    echo "[install] step 1/3: fairchem-core 1.10.0 stack"
    "${PIP[@]}" install "fairchem-core==1.10.0" "torch-geometric==2.6.1" "scipy<1.15" e3nn lmdb \
        submitit wandb "ase<3.26" pytest ruff
fi
# radius_graph of torch-geometric 2.6 calls torch-cluster (2.7+ calls pyg-lib: not served here)
if ! "$VENV/bin/python" -c "import torch_geometric as g, sys; sys.exit(g.__version__ != '2.6.1')"; then
    "${PIP[@]}" install -q "torch-geometric==2.6.1"
fi
if ! "$VENV/bin/python" -c "import torch_scatter, torch_sparse" 2>/dev/null; then
    echo "[install] step 2/3: torch-scatter, torch-sparse (compiling, 15-25 min on 2 cores)"
    MAX_JOBS=${MAX_JOBS:-$(nproc)} "${PIP[@]}" install --no-build-isolation torch-scatter torch-sparse
fi
if ! "$VENV/bin/python" -c "import torch_cluster" 2>/dev/null; then
    echo "[install] step 2/3: torch-cluster (compiling)"
    MAX_JOBS=${MAX_JOBS:-$(nproc)} "${PIP[@]}" install --no-build-isolation "torch-cluster==1.6.3"
fi
if ! "$VENV/bin/python" -c "import tblite.ase, rdkit, ase_db_backends" 2>/dev/null; then
    "${PIP[@]}" install -q "tblite==0.8.0" rdkit "ase-db-backends==0.11.0"
fi
# fairchem 1.10's relaxations need ase<3.26 (from 3.26 its OptimizableBatch is abstract)
if ! "$VENV/bin/python" -c "import ase, sys; sys.exit(tuple(map(int, ase.__version__.split('.')[:2])) >= (3, 26))"; then
    "${PIP[@]}" install -q "ase<3.26"
fi
echo "[install] step 3/3: fairchem-dens (editable)"
"${PIP[@]}" install -q --no-build-isolation -e ".[dev]"
"$VENV/bin/python" -c "import fairchem_dens, fairchem.core, torch; print('[install] ok: fairchem-dens', fairchem_dens.__version__, '| fairchem-core', fairchem.core.__version__, '| torch', torch.__version__)"
