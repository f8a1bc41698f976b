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
