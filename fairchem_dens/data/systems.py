"""Build random adsorbate/slab systems and relax them with ASE's EMT calculator.

Only numpy and ASE are imported here (no torch), so worker processes stay light. Every system is
fully determined by ``(seed, variant, sid)`` through its own :class:`numpy.random.SeedSequence`,
which makes the generated data independent of the number of worker processes.

Units: positions and cells in Å, energies in eV, forces in eV/Å.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.build import fcc100, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.optimize import BFGS

from .options import DEFAULT_METALS, EMT_METALS  # noqa: F401  (re-exported)

#: Adsorbates as (symbols, positions in Å relative to the binding atom, before rotation).
#: The first atom binds to the surface; the molecular axis points along +z before tilting.
ADSORBATES: dict[str, tuple[str, np.ndarray]] = {
    "H": ("H", np.zeros((1, 3))),
    "C": ("C", np.zeros((1, 3))),
    "N": ("N", np.zeros((1, 3))),
    "O": ("O", np.zeros((1, 3))),
    "OH": ("OH", np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.97]])),
    "CO": ("CO", np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.15]])),
    "NO": ("NO", np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.16]])),
    "N2": ("N2", np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.10]])),
    "O2": ("O2", np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.21]])),
}

#: Variant codes mixed into the per-system seed so OC20 and OC22 systems differ.
VARIANT_CODES: dict[str, int] = {"oc20": 20, "oc22": 22}

# Per-system geometry choices (drawn uniformly).
SURFACE_SIZES: tuple[tuple[int, int], ...] = ((2, 2), (3, 3))
LAYER_COUNTS: tuple[int, ...] = (3, 4)
FACETS: tuple[str, ...] = ("111", "100")
VACUUM_RANGE: tuple[float, float] = (6.0, 8.0)  # Å of vacuum on each side of the slab
HEIGHT_RANGE: tuple[float, float] = (1.0, 2.6)  # Å of the binding atom above the top layer
MAX_TILT_DEG: float = 60.0  # max tilt of a molecular axis from the surface normal
RATTLE_STD: float = 0.05  # Å, Gaussian rattle of the free slab atoms


@dataclass
class Trajectory:
    """One relaxation trajectory (all frames, before any filtering).

    Attributes:
        sid: system id.
        variant: ``"oc20"`` (bottom layers fixed) or ``"oc22"`` (all atoms free).
        description: human-readable system label, e.g. ``"Cu(111) 3x3x4 + CO"``.
        atomic_numbers: (n,) int64 atomic numbers.
        tags: (n,) int64, 0 subsurface, 1 surface (top layer), 2 adsorbate.
        fixed: (n,) bool, True for atoms held by ``FixAtoms``.
        cell: (3, 3) float64 cell vectors in Å (rows).
        positions: (T, n, 3) float64 positions in Å for each of the T frames.
        energies: (T,) float64 total EMT energies in eV.
        forces: (T, n, 3) float64 forces in eV/Å (``apply_constraint=False``, as in OC20).
        converged: whether BFGS reached ``fmax`` within the step budget.
    """

    sid: int
    variant: str
    description: str
    atomic_numbers: np.ndarray
    tags: np.ndarray
    fixed: np.ndarray
    cell: np.ndarray
    positions: np.ndarray
    energies: np.ndarray
    forces: np.ndarray
    converged: bool


def system_rng(seed: int, variant: str, sid: int) -> np.random.Generator:
    """Return the random generator of system ``sid`` (independent of worker layout)."""
    return np.random.default_rng(np.random.SeedSequence([seed, VARIANT_CODES[variant], sid]))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Rotation matrix (3, 3) tilting +z by up to ``MAX_TILT_DEG`` with a random azimuth."""
    tilt = np.deg2rad(rng.uniform(0.0, MAX_TILT_DEG))
    azim = rng.uniform(0.0, 2.0 * np.pi)
    ct, st, ca, sa = np.cos(tilt), np.sin(tilt), np.cos(azim), np.sin(azim)
    rot_y = np.array([[ct, 0.0, st], [0.0, 1.0, 0.0], [-st, 0.0, ct]])
    rot_z = np.array([[ca, -sa, 0.0], [sa, ca, 0.0], [0.0, 0.0, 1.0]])
    return rot_z @ rot_y


def build_system(seed: int, variant: str, sid: int, metals: tuple[str, ...]) -> tuple[Atoms, str]:
    """Build the (unrelaxed, non-equilibrium) adsorbate+slab system ``sid``.

    The slab is an fcc(111) or fcc(100) surface of a random metal from ``metals``, 2x2 or 3x3,
    3 or 4 layers, 6-8 Å vacuum on each side. The adsorbate's binding atom sits at a uniformly
    random lateral position 1.0-2.6 Å above the top layer; molecules are randomly tilted. Free slab
    atoms are rattled by 0.05 Å. ``oc20``: every layer below the top one is fixed. ``oc22``: no
    constraint. Tags: 0 subsurface layers, 1 top layer, 2 adsorbate.

    Returns:
        (atoms, description) with an EMT calculator attached.
    """
    rng = system_rng(seed, variant, sid)
    metal = metals[int(rng.integers(len(metals)))]
    facet = FACETS[int(rng.integers(len(FACETS)))]
    size = SURFACE_SIZES[int(rng.integers(len(SURFACE_SIZES)))]
    layers = LAYER_COUNTS[int(rng.integers(len(LAYER_COUNTS)))]
    vacuum = float(rng.uniform(*VACUUM_RANGE))
    ads_name = list(ADSORBATES)[int(rng.integers(len(ADSORBATES)))]

    builder = fcc111 if facet == "111" else fcc100
    slab = builder(metal, size=(size[0], size[1], layers), vacuum=vacuum)
    # ASE tags slab layers 1 (top) .. layers (bottom).
    layer_tag = slab.get_tags()
    tags = np.where(layer_tag == 1, 1, 0).astype(np.int64)
    fixed = (tags == 0) if variant == "oc20" else np.zeros(len(slab), dtype=bool)

    pos = slab.get_positions()
    free = ~fixed
    pos[free] += rng.normal(0.0, RATTLE_STD, size=(int(free.sum()), 3))

    symbols, rel = ADSORBATES[ads_name]
    rel = rel @ _random_rotation(rng).T
    frac_xy = rng.uniform(0.0, 1.0, size=2)
    cell = np.array(slab.get_cell())
    anchor_xy = frac_xy @ cell[:2, :2]
    height = float(rng.uniform(*HEIGHT_RANGE))
    top_z = float(pos[tags == 1, 2].max())
    anchor = np.array([anchor_xy[0], anchor_xy[1], top_z + height])
    ads_pos = anchor + rel

    atoms = Atoms(
        symbols=slab.get_chemical_symbols() + list(Atoms(symbols).get_chemical_symbols()),
        positions=np.concatenate([pos, ads_pos]),
        cell=cell,
        pbc=slab.pbc,
    )
    n_ads = len(ads_pos)
    atoms.set_tags(np.concatenate([tags, np.full(n_ads, 2, dtype=np.int64)]))
    fixed_all = np.concatenate([fixed, np.zeros(n_ads, dtype=bool)])
    if fixed_all.any():
        atoms.set_constraint(FixAtoms(mask=fixed_all))
    atoms.calc = EMT()
    desc = f"{metal}({facet}) {size[0]}x{size[1]}x{layers} + {ads_name}"
    return atoms, desc


def relax_system(
    seed: int,
    variant: str,
    sid: int,
    metals: tuple[str, ...],
    max_steps: int,
    fmax: float = 0.05,
) -> Trajectory:
    """Build system ``sid`` and relax it with BFGS, recording every optimizer frame.

    Frame 0 is the initial structure; one frame is recorded after each BFGS step, so a run has
    at most ``max_steps + 1`` frames. Forces are recorded with ``apply_constraint=False``, i.e.
    fixed atoms keep their true (non-zero) forces, as in the OC20 LMDBs.

    Args:
        seed: global seed.
        variant: ``"oc20"`` or ``"oc22"``.
        sid: system id.
        metals: metals to draw from.
        max_steps: maximum number of BFGS steps.
        fmax: BFGS convergence threshold on the largest free-atom force, eV/Å.
    """
    atoms, desc = build_system(seed, variant, sid, metals)
    opt = BFGS(atoms, logfile=None)
    positions, energies, forces = [], [], []
    converged = False
    for converged in opt.irun(fmax=fmax, steps=max_steps):  # noqa: B007
        positions.append(atoms.get_positions())
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces(apply_constraint=False))
    fixed = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.index] = True
    return Trajectory(
        sid=sid,
        variant=variant,
        description=desc,
        atomic_numbers=atoms.get_atomic_numbers().astype(np.int64),
        tags=atoms.get_tags().astype(np.int64),
        fixed=fixed,
        cell=np.array(atoms.get_cell()),
        positions=np.stack(positions),
        energies=np.asarray(energies, dtype=np.float64),
        forces=np.stack(forces),
        converged=bool(converged),
    )


def relax_system_star(args: tuple) -> Trajectory:
    """``relax_system(*args)`` for ``multiprocessing.Pool.imap``."""
    return relax_system(*args)
