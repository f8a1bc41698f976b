"""Corruption of one structure (Alg. 1 l.7-27, Eq. 2, Eq. 7): plain numpy, no fairchem.

Every random number used for structure ``index`` in epoch ``epoch`` comes from its own generator
seeded with ``(seed, epoch, index)`` (:func:`structure_rng`), so the corruption is the same with
any number of DataLoader workers or ranks, and after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from fairchem_dens.config import DeNSConfig


class Status(IntEnum):
    """Why a training structure is, or is not, a DeNS structure (stored in ``dens_status``)."""

    ORIGINAL = 0  # p >= p_DeNS: the original task (Alg. 1 l.33)
    DENS = 1  # corrupted and denoised (Alg. 1 l.8-32)
    NO_ATOM = 2  # drawn for DeNS but no atom was corrupted: falls back to the original task
    MAX_FORCE = 3  # ineligible: largest candidate force norm above ``max_force_norm``
    MIN_ATOMS = 4  # ineligible: fewer candidate atoms than ``min_num_atoms``
    MAX_RATIO = 5  # drawn corrupted fraction above ``max_corrupted_ratio``: original task
    OPT_OUT = 6  # never corrupted: carries the ``skip_flag`` or is listed in ``skip_list``
    MAX_STRESS = 7  # ineligible: stress norm above ``max_stress_norm``


#: Statuses of structures that may never be DeNS structures (filters and opt-outs).
INELIGIBLE = (Status.MAX_FORCE, Status.MIN_ATOMS, Status.OPT_OUT, Status.MAX_STRESS)


def sigma_grid(sigma_low: float, sigma_high: float, num_sigmas: int) -> np.ndarray:
    """The T noise scales of multi-scale noise, a geometric progression (Eq. 7).

    Returns:
        (T,) float64 array in Å with σ_1 = σ_low and σ_T = σ_high.
    """
    k = np.arange(num_sigmas, dtype=np.float64)
    # Eq. 7: σ_k = exp(ln σ_low + (k-1)/(T-1) · (ln σ_high − ln σ_low)), k = 1..T
    return np.exp(
        np.log(sigma_low) + k / (num_sigmas - 1) * (np.log(sigma_high) - np.log(sigma_low))
    )


def stress_norm(stress: np.ndarray) -> float:
    """Frobenius norm ‖σ‖_F = sqrt(Σ_ab σ_ab²) of a (3, 3) (or 9-component) stress, in its unit
    (eV/Å³ for fairchem's labels); invariant under rotations."""
    return float(np.sqrt(np.square(np.asarray(stress, dtype=np.float64)).sum()))


def structure_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Generator that depends only on (seed, epoch, index): one per structure and epoch."""
    return np.random.default_rng([int(seed) % 2**63, int(epoch), int(index)])


@dataclass(frozen=True)
class Corruption:
    """The draw for one structure of ``n`` atoms.

    Attributes:
        status: a :class:`Status`; only ``Status.DENS`` structures are corrupted.
        sigma: σ in Å (0 unless ``status`` is DENS).
        mask: (n,) bool, m_i of Alg. 1 l.19.
        noise: (n, 3) float64, ε_i in Å; exactly 0 where ``mask`` is False.
    """

    status: Status
    sigma: float
    mask: np.ndarray
    noise: np.ndarray

    @classmethod
    def original(cls, num_atoms: int, status: Status = Status.ORIGINAL) -> Corruption:
        """An uncorrupted structure (original task, Eq. 1)."""
        return cls(status, 0.0, np.zeros(num_atoms, bool), np.zeros((num_atoms, 3)))


def draw_corruption(
    config: DeNSConfig,
    rng: np.random.Generator,
    candidates: np.ndarray,
    forces: np.ndarray | None = None,
    stress: np.ndarray | None = None,
    opt_out: bool = False,
) -> Corruption:
    """Decide and draw the corruption of one structure (Alg. 1 l.7-23).

    The filters run before any random number is drawn, so a structure's draw never depends on
    whether another structure was filtered.

    Args:
        config: validated DeNS settings.
        rng: the structure's own generator (:func:`structure_rng`).
        candidates: (n,) bool, atoms that may be corrupted (free atoms in OC20 mode).
        forces: (n, 3) raw forces in eV/Å; read only by the ``max_force_norm`` filter.
        stress: (3, 3) raw stress in eV/Å³ (ASE's unit); read only by ``max_stress_norm``.
        opt_out: the structure opted out (``skip_flag`` / ``skip_list``): never corrupted.

    Returns:
        The :class:`Corruption`; non-candidate atoms are never corrupted.
    """
    n = candidates.shape[0]
    if opt_out:
        return Corruption.original(n, Status.OPT_OUT)
    num_candidates = int(candidates.sum())
    if config.min_num_atoms is not None and num_candidates < config.min_num_atoms:
        return Corruption.original(n, Status.MIN_ATOMS)
    if config.max_force_norm is not None and num_candidates > 0:
        if forces is None:
            raise ValueError("max_force_norm needs the structure's forces")
        largest = float(np.linalg.norm(forces[candidates], axis=-1).max())
        if largest > config.max_force_norm:
            return Corruption.original(n, Status.MAX_FORCE)
    if config.max_stress_norm is not None:
        if stress is None:
            raise ValueError("max_stress_norm needs the structure's stress")
        if stress_norm(stress) > config.max_stress_norm:
            return Corruption.original(n, Status.MAX_STRESS)

    if rng.random() >= config.prob:  # Alg. 1 l.7-8: p ~ U(0, 1), DeNS if p < p_DeNS
        return Corruption.original(n, Status.ORIGINAL)
    if config.multi_scale:  # Alg. 1 l.9-10: σ sampled from {σ_k} of Eq. 7
        grid = sigma_grid(config.sigma_low, config.sigma_high, config.num_sigmas)
        sigma = float(grid[rng.integers(config.num_sigmas)])
    else:  # Alg. 1 l.12
        sigma = float(config.sigma)
    mask = candidates & (rng.random(n) < config.corrupt_ratio)  # Alg. 1 l.15-16, l.19
    num_corrupted = int(mask.sum())
    if num_corrupted == 0:
        return Corruption.original(n, Status.NO_ATOM)
    if (
        config.max_corrupted_ratio is not None
        and num_corrupted > config.max_corrupted_ratio * num_candidates
    ):
        return Corruption.original(n, Status.MAX_RATIO)
    # Eq. 2 / Alg. 1 l.17: ε_i ~ N(0, σ² I_3) on corrupted atoms only
    noise = rng.normal(0.0, sigma, size=(n, 3)) * mask[:, None]
    return Corruption(Status.DENS, sigma, mask, noise)
