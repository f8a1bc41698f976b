#!/usr/bin/env bash
# The demo: generate the default EMT dataset (OC20 and OC22 style), then train a small
# EquiformerV2 + DeNS on CPU with the stock fairchem CLI, and print the checkpoint and the last
# validation energy/force MAE. Run from anywhere; expects scripts/install.sh to have run.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DATA=data/demo
RUN=runs/demo
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

if [ ! -f "$DATA/oc20/normalizers.yml" ]; then
    "$VENV/bin/python" -m fairchem_dens.data --out "$DATA" --variant both --seed 0
fi
mkdir -p "$RUN"
log="$RUN/train.log"
"$VENV/bin/fairchem" --mode train --config-yml configs/demo/equiformer_v2_dens.yml --cpu \
    --run-dir "$RUN" --identifier demo --print-every 10 "$@" 2>&1 | tee "$log"

checkpoint=$(ls -t "$RUN"/checkpoints/*/checkpoint.pt | head -n 1)
echo "checkpoint: $checkpoint"
# fairchem's validate() logs "energy_mae: ..., forces_mae: ..." from base_trainer.py
echo "last validation: $(grep -E 'base_trainer.py:[0-9]+: \(INFO\): energy_mae' "$log" | tail -n 1 | sed -E 's/.*\(INFO\): //')"
