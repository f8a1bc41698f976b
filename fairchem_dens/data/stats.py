"""Normalizer statistics and linear element references of a train split (numpy only).

Conventions follow fairchem-core 1.10 ``modules/normalization/normalizer.py::fit_normalizers`` so
that the written values equal what ``transforms.normalizer.fit`` would compute on the same data:

* energy: ``mean`` = mean of the per-frame energies, ``rmsd`` = their standard deviation with
  ``ddof=1`` (fairchem uses ``rmsd_correction=1`` whenever the mean is non-zero);
* forces: ``mean`` = 0 (override), ``rmsd = sqrt(sum_i |F_i|^2 / N_atoms)`` over all atoms of all
  train frames (fairchem's forces target vector has one row per atom, ``rmsd_correction=0``).
  This equals ``sqrt(3)`` times the per-component RMS, which is also reported.

Element references mirror ``element_references.py::fit_linear_references``: least squares
(``numpy.linalg.lstsq``) of the energy on per-element atom counts, restricted to elements present
in the data, stored as a length-119 vector indexed by atomic number (eV/atom).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

#: Length of the element-reference vector (atomic numbers 0..118), as fairchem's fit produces.
NUM_ELEMENT_SLOTS = 119


def energy_force_stats(energies: np.ndarray, forces: np.ndarray) -> dict[str, float]:
    """Normalizer statistics.

    Args:
        energies: (F,) per-frame energies, eV.
        forces: (N_atoms_total, 3) forces of all atoms of all frames, eV/Å.

    Returns:
        dict with ``energy_mean``, ``energy_std`` (ddof=1; 1.0 if fewer than 2 frames),
        ``force_mean`` (0.0), ``force_std`` (fairchem rmsd convention, eV/Å) and
        ``force_rms_component`` (per-component RMS, eV/Å).
    """
    e = np.asarray(energies, dtype=np.float64)
    f = np.asarray(forces, dtype=np.float64).reshape(-1, 3)
    energy_std = float(e.std(ddof=1)) if e.size > 1 else 1.0
    sq = float((f**2).sum())
    return {
        "energy_mean": float(e.mean()),
        "energy_std": energy_std,
        "force_mean": 0.0,
        "force_std": float(np.sqrt(sq / max(f.shape[0], 1))),
        "force_rms_component": float(np.sqrt(sq / max(f.size, 1))),
    }


def composition_matrix(atomic_numbers: list[np.ndarray]) -> np.ndarray:
    """(F, 119) float64 matrix of per-frame element counts from per-frame atomic numbers."""
    return np.stack(
        [np.bincount(z.astype(np.int64), minlength=NUM_ELEMENT_SLOTS) for z in atomic_numbers]
    ).astype(np.float64)


def fit_element_references(counts: np.ndarray, energies: np.ndarray) -> np.ndarray:
    """Least-squares linear element references.

    Args:
        counts: (F, 119) element counts per frame.
        energies: (F,) energies, eV.

    Returns:
        (119,) float64 references in eV/atom; zero for elements absent from ``counts``.
    """
    mask = counts.sum(axis=0) != 0.0
    solution = np.linalg.lstsq(counts[:, mask], np.asarray(energies, np.float64), rcond=None)[0]
    coeff = np.zeros(NUM_ELEMENT_SLOTS, dtype=np.float64)
    coeff[mask] = solution
    return coeff


def normalizer_fields(
    energies: np.ndarray, forces: np.ndarray, total_energies: np.ndarray | None = None
) -> dict[str, Any]:
    """The ``stats.json`` fields of the energy and forces normalizers of a train split.

    Args:
        energies: (F,) the energy target per frame (total, or referenced), eV.
        forces: (N_atoms_total, 3) forces of all train atoms, eV/Å.
        total_energies: (F,) total energies when ``energies`` are referenced; None: the same.
    """
    norm = energy_force_stats(energies, forces)
    total = norm if total_energies is None else energy_force_stats(total_energies, forces)
    return {
        "energy_mean": norm["energy_mean"],
        "energy_std": norm["energy_std"],
        "energy_std_ddof": 1,
        "force_mean": 0.0,
        "force_std": norm["force_std"],
        "force_std_definition": "sqrt(sum_i |F_i|^2 / N_atoms) over all train atoms "
        "(fairchem fit_normalizers convention with forces mean 0)",
        "force_rms_component": norm["force_rms_component"],
        "total_energy_mean": total["energy_mean"],
        "total_energy_std": total["energy_std"],
    }


def energy_force_normalizer(stats: dict[str, Any]) -> dict[str, dict[str, float]]:
    """fairchem's ``transforms.normalizer`` entries of energy and forces from ``stats``."""
    return {
        "energy": {"mean": stats["energy_mean"], "rmsd": stats["energy_std"]},
        "forces": {"mean": 0.0, "rmsd": stats["force_std"]},
    }


def write_stats_files(
    folder: Path, stats: dict[str, Any], transforms: dict[str, Any], header: str
) -> None:
    """Write ``folder/stats.json`` and ``folder/normalizers.yml`` (fairchem's
    ``dataset.train.transforms``, to include from a config, after the comment ``header``)."""
    import yaml

    (folder / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    body = yaml.safe_dump({"dataset": {"train": {"transforms": transforms}}}, sort_keys=False)
    (folder / "normalizers.yml").write_text(header + body)
