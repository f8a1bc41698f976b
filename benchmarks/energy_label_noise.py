"""How wrong is the clean energy label of a DeNS structure? (issue 14, the energy regression)

Eq. 6 trains a DeNS structure's energy against the label of the *uncorrupted* structure. To first
order the corrupted geometry's energy differs from it by ΔE = −Σ_i f_i · ε_i over the corrupted
atoms (Eq. 2 noise ε_i ~ N(0, σ² I) on atoms drawn with probability r_DeNS, Alg. 1 l.15-17).
This script draws that for the training frames of the molecular benchmark data and prints the
mean absolute and rms ΔE next to the energy std of the split.

One command (from the repository root; seconds)::

    .venv/bin/python benchmarks/energy_label_noise.py [--molecule ethanol --sigma 0.05 --ratio 0.25]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import molecules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--molecule", default="ethanol", choices=list(molecules.DATA_ARGS))
    parser.add_argument("--sigma", type=float, default=molecules.DENS["sigma"], help="σ (Å)")
    parser.add_argument("--ratio", type=float, default=molecules.DENS["corrupt_ratio"])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--draws", type=int, default=50, help="corruptions per frame")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from fairchem.core.datasets.lmdb_dataset import LmdbDataset

    folder = molecules.ensure_data(args.molecule)
    dataset = LmdbDataset({"src": str(folder / "train")})
    rng = np.random.default_rng(args.seed)
    changes = []
    for index in range(min(args.frames, len(dataset))):
        forces = dataset[index].force.numpy()  # (n, 3) eV/Å
        for _ in range(args.draws):
            mask = rng.random(len(forces)) < args.ratio
            noise = rng.normal(0.0, args.sigma, size=forces.shape) * mask[:, None]
            changes.append(-(forces * noise).sum())  # first-order ΔE in eV
    delta = 1000 * np.asarray(changes)
    stats = json.loads((folder / "stats.json").read_text())
    print(
        f"{args.molecule}, σ {args.sigma} Å, r_DeNS {args.ratio}: first-order |ΔE| of a DeNS "
        f"structure mean {np.abs(delta).mean():.1f} meV, rms {np.sqrt((delta**2).mean()):.1f} meV; "
        f"train energy std {1000 * stats['energy_std']:.1f} meV "
        f"({min(args.frames, len(dataset))} frames x {args.draws} draws, seed {args.seed})"
    )


if __name__ == "__main__":
    main()
