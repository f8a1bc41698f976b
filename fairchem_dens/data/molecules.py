"""MD17-style molecular S2EF datasets from GFN2-xTB Langevin molecular dynamics.

One small molecule per dataset, frames sampled from one Langevin trajectory at a fixed temperature
and split at random into train/val/test, as in MD17 (Chmiela et al. 2017), which DeNS evaluates on
(paper Sec. 4.3, Table 4). The labels are **GFN2-xTB** energies and forces computed here with
``tblite`` (not MD17's DFT labels), so compare relative gains with the paper, not absolute MAEs.

CLI: ``python -m fairchem_dens.data molecules --molecules ethanol aspirin --out DIR``; Python:
:func:`generate_molecules`. See ``docs/data.md``.

Pipeline per molecule (fully determined by ``(seed, molecule)`` and the MD arguments):

1. **Start geometry:** RDKit ETKDGv3 embedding of the SMILES (hydrogens added) with a random seed
   drawn from the molecule's seed sequence, then an MMFF94 optimisation.
2. **Dynamics:** ASE ``Langevin`` (BBK-type integrator) at ``temperature`` K with time step
   ``timestep_fs`` (0.5 fs, MD17's step) and friction ``friction_per_fs`` (0.01 fs⁻¹, i.e. a
   100 fs velocity relaxation time: weak enough to leave the vibrational dynamics intact, strong
   enough to hold the temperature). Initial velocities are Maxwell-Boltzmann at ``temperature``
   with no centre-of-mass motion or rotation. The forces are GFN2-xTB (``tblite.ase.TBLite``,
   default accuracy, each SCF restarted from the previous step's wavefunction).
   ``fixcm=False``: ASE 3.25's ``fixcm=True`` removes the centre-of-mass part of the random
   momenta with a per-atom ``1/m_i`` factor, which over-heats light atoms; ethanol then ran at
   ~650 K instead of 500 K (NVE conserves the energy, so it is the thermostat). With
   ``fixcm=False`` it holds 500 K; the centre of mass diffuses, which changes nothing (every
   stored frame is re-centred, energies and forces are translation invariant).
3. **Sampling:** after ``equilibration`` steps (default 2000 = 1 ps = 10 thermostat relaxation
   times), one frame every ``spacing`` steps until ``train + val + test`` frames are recorded.
4. **Split:** a seeded random permutation of the frames gives test, val and train (each split is
   then stored in time order), so the splits interleave in time as MD17's random splits do.

Why ``spacing = 100`` steps (50 fs at 0.5 fs). A 16k-step pilot of ethanol at 500 K gave a
mass-weighted velocity autocorrelation whose first zero is at ~6 fs but whose envelope stays at
|C| ~ 0.4 up to ~40 fs (coherent C-H/O-H stretches and bends), falls to <= 0.2 beyond 40 fs and to
<= 0.08 beyond 100 fs; the potential-energy autocorrelation has an integrated time of ~65 fs,
dominated by the slow torsions. 50 fs frames thus have decorrelated velocities and partly
decorrelated structures. It is also MD17-like: the 2000 random frames of MD17 aspirin come from a
211,762-step trajectory at 0.5 fs, a mean gap of ~106 steps (ethanol: 555,092 steps, ~280).
The cost is ``equilibration + spacing * frames`` GFN2-xTB gradients per molecule.

Units: positions Å, energies eV, forces eV/Å, time fs, temperature K.

Only numpy is imported at module level: ASE, RDKit and tblite are imported where the MD runs (so a
worker process loads them after its thread count is pinned), torch where the LMDBs are written.
tblite's C library cannot load into a process that has already imported torch (torch bundles an
older ``libgomp`` without ``GOMP_5.0``), so the MD runs in this process only if torch is not
loaded yet or tblite already is; otherwise in a spawned worker (see :func:`_run_all`).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import options
from .options import SPLITS, THREAD_ENV, check_writable

#: The eight MD17 molecules: canonical name -> SMILES (hydrogens are added by RDKit).
#: The insertion order fixes each molecule's ``sid`` in the LMDBs and its seed stream.
MOLECULES: dict[str, str] = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",  # C9H8O4, 21 atoms
    "benzene": "c1ccccc1",  # C6H6, 12 atoms
    "ethanol": "CCO",  # C2H6O, 9 atoms
    "malonaldehyde": "O/C=C\\C=O",  # C3H4O2, 9 atoms: (Z)-enol with the O-H...O bond, as MD17
    "naphthalene": "c1ccc2ccccc2c1",  # C10H8, 18 atoms
    "salicylic_acid": "OC(=O)c1ccccc1O",  # C7H6O3, 16 atoms
    "toluene": "Cc1ccccc1",  # C7H8, 15 atoms
    "uracil": "O=c1cc[nH]c(=O)[nH]1",  # C4H4N2O2, 12 atoms
}

#: Other accepted spellings (compared after lower-casing and mapping "-"/" " to "_").
ALIASES: dict[str, str] = {"salicylic": "salicylic_acid", "malondialdehyde": "malonaldehyde"}

DEFAULT_TRAIN = 950  # MD17 training-set size used by DeNS (paper Sec. 4.3)
DEFAULT_VAL = 50
DEFAULT_TEST = 1000
DEFAULT_TEMPERATURE = 500.0  # K, MD17's temperature
DEFAULT_SPACING = 100  # MD steps between recorded frames (see the module docstring)
DEFAULT_TIMESTEP_FS = 0.5  # fs, MD17's time step
DEFAULT_EQUILIBRATION = 2000  # MD steps before the first recorded frame (1 ps at 0.5 fs)
DEFAULT_FRICTION_PER_FS = 0.01  # 1/fs, Langevin friction (100 fs relaxation time)
METHOD = "GFN2-xTB"

#: The cubic box leaves at least this much room on each side of the molecule: every periodic
#: image of any atom is >= 2 * CELL_MARGIN Å away from every atom, so a periodic radius graph
#: with any cutoff up to 24 Å equals the non-periodic one.
CELL_MARGIN = 12.0
#: Atoms i, j are bonded when closer than BOND_SCALE * (r_cov,i + r_cov,j) (ASE covalent radii);
#: frames whose bond graph differs from the start geometry's are counted (not dropped).
BOND_SCALE = 1.25
#: Tag of every atom ("adsorbate" in OC20's 0/1/2 convention; no model here reads it).
MOLECULE_TAG = 2


def canonical_name(name: str) -> str:
    """Canonical molecule name of ``name`` (case, ``-``/space and aliases tolerated).

    Raises:
        ValueError: one line naming the unknown molecule and listing the known ones.
    """
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    key = ALIASES.get(key, key)
    if key not in MOLECULES:
        raise ValueError(f"unknown molecule {name!r} (known: {', '.join(MOLECULES)})")
    return key


def parse_molecules(molecules: str | Sequence[str]) -> tuple[str, ...]:
    """Canonical names of ``molecules`` (a sequence, or one comma-separated string), deduplicated.

    Raises:
        ValueError: if none is given or one is unknown.
    """
    items = molecules.split(",") if isinstance(molecules, str) else list(molecules)
    items = [str(m) for m in items if str(m).strip()]
    if not items:
        raise ValueError(f"no molecules given (known: {', '.join(MOLECULES)})")
    return tuple(dict.fromkeys(canonical_name(m) for m in items))


def tblite_loadable_here() -> bool:
    """True if tblite can load in this process: it already did, or torch has not been imported.

    Once torch is imported, its bundled ``libgomp`` (no ``GOMP_5.0``) shadows the one tblite's
    C extension needs, and ``import tblite.ase`` fails.
    """
    return "tblite._libtblite" in sys.modules or "torch" not in sys.modules


def _import_tblite_calculator() -> Any:
    """``tblite.ase.TBLite``, with a one-line explanation if its C library cannot load."""
    try:
        from tblite.ase import TBLite
    except ImportError as err:
        if "torch" in sys.modules and "GOMP" in str(err.__cause__ or err):
            raise ImportError(
                "tblite cannot load after torch in one process (torch's bundled libgomp lacks "
                "GOMP_5.0); import tblite before torch, or use generate_molecules(), which runs "
                "the MD in a fresh process"
            ) from err
        raise
    return TBLite


def require_backends() -> None:
    """Check that the MD backends (tblite, RDKit) are installed.

    Raises:
        ImportError: one line naming the missing package(s) and the pip command.
    """
    import importlib.util

    missing = [pkg for pkg in ("tblite", "rdkit") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise ImportError(
            f"the molecules generator needs {' and '.join(missing)} "
            "(pip install tblite rdkit, or rerun scripts/install.sh)"
        )


def molecule_seed(seed: int, name: str) -> np.random.SeedSequence:
    """Seed sequence of molecule ``name`` (independent of the other molecules requested)."""
    return np.random.SeedSequence([seed, 17, list(MOLECULES).index(name)])


def split_frames(n_train: int, n_val: int, n_test: int, seed: int, name: str) -> dict[str, Any]:
    """Frame indices of each split: a seeded random permutation of ``0..N-1``.

    Returns:
        {"train"|"val"|"test": sorted int64 array of frame indices}, disjoint, covering 0..N-1.
    """
    total = n_train + n_val + n_test
    rng = np.random.default_rng(molecule_seed(seed, name).spawn(2)[1])
    perm = rng.permutation(total)
    return {
        "test": np.sort(perm[:n_test]),
        "val": np.sort(perm[n_test : n_test + n_val]),
        "train": np.sort(perm[n_test + n_val :]),
    }


@dataclass
class MDTrajectory:
    """Recorded frames of one molecule's Langevin run.

    Attributes:
        name: canonical molecule name.
        smiles: SMILES it was built from.
        atomic_numbers: (n,) int64.
        positions: (F, n, 3) float64, Å (as simulated: the centre of mass diffuses).
        energies: (F,) float64 GFN2-xTB total energies, eV.
        forces: (F, n, 3) float64 GFN2-xTB forces, eV/Å.
        steps: (F,) int64 MD step of each frame (counted from the start of equilibration).
        temperatures: (F,) float64 instantaneous kinetic temperatures, K.
        bond_changed: (F,) bool, the bond graph differs from the start geometry's.
        time_s: wall time of the MD, s.
    """

    name: str
    smiles: str
    atomic_numbers: np.ndarray
    positions: np.ndarray
    energies: np.ndarray
    forces: np.ndarray
    steps: np.ndarray
    temperatures: np.ndarray
    bond_changed: np.ndarray
    time_s: float


def build_molecule(name: str, seed: int) -> tuple[Any, np.random.Generator]:
    """RDKit ETKDGv3 + MMFF94 start geometry of molecule ``name``.

    Returns:
        (``ase.Atoms`` without cell or pbc, the molecule's generator for the MD's random numbers;
        its first draw was the RDKit embedding seed).
    """
    from ase import Atoms
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(MOLECULES[name]))
    params = AllChem.ETKDGv3()
    rng = np.random.default_rng(molecule_seed(seed, name).spawn(2)[0])
    params.randomSeed = int(rng.integers(1, 2**31 - 1))
    if AllChem.EmbedMolecule(mol, params) != 0:
        raise RuntimeError(f"{name}: RDKit could not embed {MOLECULES[name]!r}")
    AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    symbols = [atom.GetSymbol() for atom in mol.GetAtoms()]
    return Atoms(symbols, positions=mol.GetConformer().GetPositions(), pbc=False), rng


def bond_graph(positions: np.ndarray, atomic_numbers: np.ndarray) -> np.ndarray:
    """Covalent bond graphs: (F, n, n) bool from positions (F, n, 3) Å (no self bonds)."""
    from ase.data import covalent_radii

    r = covalent_radii[atomic_numbers]
    limit = BOND_SCALE * (r[:, None] + r[None, :])  # (n, n)
    d = np.linalg.norm(positions[:, :, None, :] - positions[:, None, :, :], axis=-1)
    bonded = d < limit[None]
    bonded[:, np.arange(len(r)), np.arange(len(r))] = False
    return bonded


def run_md(
    name: str,
    frames: int,
    temperature: float,
    seed: int,
    spacing: int,
    timestep_fs: float,
    equilibration: int,
    friction_per_fs: float,
    verbose: bool = False,
) -> MDTrajectory:
    """Langevin MD of molecule ``name`` with GFN2-xTB forces; record ``frames`` frames.

    See the module docstring for the protocol. Deterministic for fixed arguments when the
    OpenMP/BLAS thread count is fixed (the callers pin it to 1).
    """
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import (
        MaxwellBoltzmannDistribution,
        Stationary,
        ZeroRotation,
    )

    TBLite = _import_tblite_calculator()

    t0 = time.perf_counter()
    atoms, rng = build_molecule(name, seed)
    z = atoms.get_atomic_numbers().astype(np.int64)
    reference_bonds = bond_graph(atoms.get_positions()[None], z)[0]
    atoms.calc = TBLite(method=METHOD, verbosity=0)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = Langevin(
        atoms,
        timestep=timestep_fs * units.fs,
        temperature_K=temperature,
        friction=friction_per_fs / units.fs,
        fixcm=False,  # see the module docstring: fixcm=True over-heats the hydrogens
        rng=rng,
    )
    if equilibration:
        dyn.run(equilibration)
    n = len(atoms)
    pos = np.empty((frames, n, 3))
    frc = np.empty((frames, n, 3))
    energy = np.empty(frames)
    temp = np.empty(frames)
    steps = np.empty(frames, dtype=np.int64)
    report = math.ceil(frames / 10)  # progress every 10 %
    for k in range(frames):
        dyn.run(spacing)
        # Langevin evaluated the forces at these positions at the end of its last step: cached.
        pos[k] = atoms.get_positions()
        energy[k] = atoms.get_potential_energy()
        frc[k] = atoms.get_forces()
        temp[k] = atoms.get_temperature()
        steps[k] = dyn.nsteps
        if verbose and ((k + 1) % report == 0 or k + 1 == frames):
            print(
                f"  {name}: {k + 1}/{frames} frames, {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    changed = (bond_graph(pos, z) != reference_bonds[None]).any(axis=(1, 2))
    return MDTrajectory(
        name=name,
        smiles=MOLECULES[name],
        atomic_numbers=z,
        positions=pos,
        energies=energy,
        forces=frc,
        steps=steps,
        temperatures=temp,
        bond_changed=changed,
        time_s=time.perf_counter() - t0,
    )


def _run_md_star(args: tuple) -> MDTrajectory:
    """``run_md(*args)`` for ``multiprocessing.Pool.imap``."""
    return run_md(*args)


def _run_all(jobs: list[tuple], workers: int) -> Iterator[MDTrajectory]:
    """Run the MD jobs, yielding trajectories in job order as they finish.

    In this process only if ``workers == 1``, the thread count was pinned before numpy loaded
    (the CLI does that) and tblite can load here (:func:`tblite_loadable_here`); otherwise in
    spawned processes started with THREAD_ENV. Either way OpenMP/BLAS is single-threaded (tblite
    reads OMP_NUM_THREADS when it loads), so the frames are bitwise the same.
    """
    if workers == 1 and options.BLAS_PINNED and tblite_loadable_here():
        for job in jobs:
            yield _run_md_star(job)
        return
    saved = {key: os.environ.get(key) for key in THREAD_ENV}
    os.environ.update(THREAD_ENV)
    try:
        pool = mp.get_context("spawn").Pool(min(workers, len(jobs)))
    finally:
        for key, val in saved.items():
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val
    with pool:
        yield from pool.imap(_run_md_star, jobs, chunksize=1)


def box_side(positions: np.ndarray) -> float:
    """Side (Å, whole number) of the cubic box: largest interatomic distance + 2 * CELL_MARGIN."""
    d = np.linalg.norm(positions[:, :, None, :] - positions[:, None, :, :], axis=-1)
    return float(math.ceil(d.max() + 2.0 * CELL_MARGIN))


def centred_positions(traj: MDTrajectory, side: float) -> np.ndarray:
    """(F, n, 3) positions, Å, each frame translated so its centre of mass is the box centre."""
    from ase.data import atomic_masses

    mass = atomic_masses[traj.atomic_numbers]
    com = np.einsum("i,fij->fj", mass, traj.positions) / mass.sum()  # (F, 3)
    return traj.positions - com[:, None, :] + 0.5 * side


def _entries(traj: MDTrajectory, frames: np.ndarray, side: float, pos: np.ndarray) -> list:
    """S2EF ``Data`` objects of the given frame indices (fields as the EMT writer's + pbc).

    ``pos`` are the (F, n, 3) positions to store (:func:`centred_positions`).
    """
    import torch
    from torch_geometric.data import Data

    n = len(traj.atomic_numbers)
    static = {
        "cell": torch.from_numpy((side * np.eye(3)).astype(np.float32)).view(1, 3, 3),
        "atomic_numbers": torch.from_numpy(traj.atomic_numbers.astype(np.float32)),
        "natoms": n,
        "tags": torch.full((n,), MOLECULE_TAG, dtype=torch.int64),
        "fixed": torch.zeros(n, dtype=torch.float32),
        "pbc": torch.zeros((1, 3), dtype=torch.bool),
        "sid": list(MOLECULES).index(traj.name),
    }
    out = []
    for k in frames:
        d = Data(pos=torch.from_numpy(pos[k].astype(np.float32)), **static)
        d.fid = int(traj.steps[k])
        d.y = float(traj.energies[k])
        d.force = torch.from_numpy(traj.forces[k].astype(np.float32))
        out.append(d)
    return out


def _write_stats(mdir: Path, traj: MDTrajectory, train: np.ndarray, extra: dict) -> dict:
    """Write ``stats.json`` and ``normalizers.yml`` of the train split (as the EMT generator)."""
    from .stats import energy_force_normalizer, normalizer_fields, write_stats_files

    stats: dict[str, Any] = {"molecule": traj.name, "split": "train", **extra}
    stats.update(
        {
            "num_frames": int(train.size),
            "num_atoms": int(train.size * len(traj.atomic_numbers)),
            "element_references": None,
            "energy_target": "total energy",
            **normalizer_fields(traj.energies[train], traj.forces[train].reshape(-1, 3)),
            "units": {"energy": "eV", "force": "eV/Angstrom"},
        }
    )
    header = (
        f"# {traj.name} train-split normalizers written by fairchem_dens.data molecules "
        "(include from a fairchem 1.10 config).\n"
        "# fairchem's create_normalizer takes mean/rmsd ('stdev' is its deprecated alias).\n"
    )
    write_stats_files(mdir, stats, {"normalizer": energy_force_normalizer(stats)}, header)
    return stats


def _write_molecule(out: Path, traj: MDTrajectory, splits: dict, extra: dict) -> dict[str, Any]:
    """Write one molecule's LMDBs, stats and normalizers; return its summary."""
    from .lmdb_io import write_lmdb

    mdir = out / traj.name
    side = box_side(traj.positions)
    pos = centred_positions(traj, side)
    paths = {}
    for split in SPLITS:
        paths[split] = str(write_lmdb(mdir / split, _entries(traj, splits[split], side, pos)))
    extra = {
        **extra,
        "smiles": traj.smiles,
        "natoms": len(traj.atomic_numbers),
        "box_side_A": side,
        "mean_kinetic_temperature_K": float(traj.temperatures.mean()),
        "bond_changed_frames": int(traj.bond_changed.sum()),
        "md_time_s": traj.time_s,
    }
    stats = _write_stats(mdir, traj, splits["train"], extra)
    return {
        "frames": {s: int(splits[s].size) for s in SPLITS},
        "natoms": len(traj.atomic_numbers),
        "box_side": side,
        "mean_temperature": float(traj.temperatures.mean()),
        "bond_changed_frames": int(traj.bond_changed.sum()),
        "md_time_s": traj.time_s,
        "paths": paths,
        "stats": stats,
    }


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_positive(name: str, value: Any) -> float:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def generate_molecules(
    out: str | os.PathLike,
    molecules: str | Sequence[str] = ("ethanol",),
    train: int = DEFAULT_TRAIN,
    val: int = DEFAULT_VAL,
    test: int = DEFAULT_TEST,
    temperature: float = DEFAULT_TEMPERATURE,
    seed: int = 0,
    spacing: int = DEFAULT_SPACING,
    timestep_fs: float = DEFAULT_TIMESTEP_FS,
    equilibration: int = DEFAULT_EQUILIBRATION,
    friction_per_fs: float = DEFAULT_FRICTION_PER_FS,
    workers: int = 1,
    verbose: bool = False,
) -> dict[str, Any]:
    """Generate MD17-style S2EF LMDBs of small molecules from GFN2-xTB Langevin MD.

    Args:
        out: output root; writes ``out/<molecule>/{train,val,test}/data.lmdb`` (+
            ``metadata.npz``), ``out/<molecule>/stats.json`` and ``normalizers.yml`` (train split).
        molecules: MD17 molecule names (see :data:`MOLECULES`; aliases such as
            ``"salicylic acid"`` accepted), or one comma-separated string.
        train, val, test: frames per split (train >= 1; val, test >= 0), all labelled.
        temperature: Langevin thermostat temperature, K (MD17: 500).
        seed: non-negative seed; the output bytes depend only on the arguments (not ``workers``).
        spacing: MD steps between recorded frames (default 100 = 50 fs, see the module docstring).
        timestep_fs: MD time step, fs.
        equilibration: MD steps before the first recorded frame.
        friction_per_fs: Langevin friction, 1/fs.
        workers: processes running molecules in parallel (one molecule per process).
        verbose: print MD progress to stderr.

    Returns:
        Summary ``{molecule: {"frames", "natoms", "box_side", "mean_temperature",
        "bond_changed_frames", "md_time_s", "paths", "stats"}, "time_s": float, "args": {...}}``.

    Raises:
        ValueError: one-line message for any invalid argument.
        ImportError: one-line message if tblite or RDKit is missing.
    """
    names = parse_molecules(molecules)
    train = _check_int("train", train, 1)
    val = _check_int("val", val, 0)
    test = _check_int("test", test, 0)
    seed = _check_int("seed", seed, 0)
    spacing = _check_int("spacing", spacing, 1)
    equilibration = _check_int("equilibration", equilibration, 0)
    workers = _check_int("workers", workers, 1)
    temperature = _check_positive("temperature", temperature)
    timestep_fs = _check_positive("timestep_fs", timestep_fs)
    friction_per_fs = _check_positive("friction_per_fs", friction_per_fs)
    out_path = check_writable(out)
    require_backends()

    t0 = time.perf_counter()
    frames = train + val + test
    md_args = (temperature, seed, spacing, timestep_fs, equilibration, friction_per_fs, verbose)
    jobs = [(name, frames, *md_args) for name in names]
    extra = {
        "seed": seed,
        "method": METHOD,
        "temperature_K": temperature,
        "timestep_fs": timestep_fs,
        "spacing_steps": spacing,
        "equilibration_steps": equilibration,
        "friction_per_fs": friction_per_fs,
    }
    summary: dict[str, Any] = {}
    for traj in _run_all(jobs, workers):
        splits = split_frames(train, val, test, seed, traj.name)
        summary[traj.name] = _write_molecule(out_path, traj, splits, extra)
        if verbose:
            print(f"  {traj.name}: wrote {out_path / traj.name}", file=sys.stderr, flush=True)
    summary["time_s"] = time.perf_counter() - t0
    summary["args"] = {
        "out": str(out_path),
        "molecules": list(names),
        "train": train,
        "val": val,
        "test": test,
        "workers": workers,
        **extra,
    }
    return summary
