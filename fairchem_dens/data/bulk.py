"""Generate a small stress-carrying dataset: strained and rattled EMT bulk cells as ``.aselmdb``.

fcc metals (Al, Cu, Ag, Au, Ni, Pd, Pt) and random binary fcc alloys of them, in cubic supercells of
4, 8 or 16 atoms, each strained by a random symmetric strain and rattled, labelled with ASE's EMT
energy (eV), forces (eV/Å) and stress (eV/Å³, ASE's unit, which fairchem's ``AtomsToGraphs`` reads
with ``r_stress``). The output is what fairchem 1.10's ``ase_db`` format (OMat24, MPtrj) reads::

    out/bulk/{train,val,test}/data.aselmdb   one ASE-DB (ase-db-backends' LMDB) per split
    out/bulk/{train,val,test}/metadata.npz   natoms per row, for ``load_balancing: atoms``
    out/bulk/normalizers.yml                 fairchem normalizers and element references
    out/bulk/element_references.npz          linear energy references fit on train (eV/atom)
    out/bulk/stats.json                      counts, label statistics and units

Structure ``k`` depends only on ``(seed, k)``: the rows (numbers, positions, cell, labels) are
deterministic per seed; the file bytes are not (ASE stores write times in each row).

Python: :func:`generate_bulk`; CLI: ``python -m fairchem_dens.data bulk --out DIR`` (:func:`main`).
See ``docs/data.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .options import SPLITS, check_writable, parse_metals, split_counts
from .stats import (
    composition_matrix,
    energy_force_normalizer,
    energy_force_stats,
    fit_element_references,
    write_stats_files,
)

if TYPE_CHECKING:
    from ase import Atoms

DB_NAME = "data.aselmdb"
METADATA_NAME = "metadata.npz"
DEFAULT_STRUCTURES = 300
DEFAULT_VAL_FRAC = 0.1
DEFAULT_TEST_FRAC = 0.1
#: Fraction of structures that are binary alloys (the rest are elemental).
DEFAULT_ALLOY_FRAC = 0.4
#: Largest |ε_ab| of the random symmetric strain (dimensionless).
DEFAULT_MAX_STRAIN = 0.04
#: Largest rattle σ (Å); each structure draws σ ~ U(0, max_rattle).
DEFAULT_MAX_RATTLE = 0.1
#: Repeats of the 4-atom cubic fcc cell: 4, 8 and 16 atoms.
SUPERCELLS: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (2, 1, 1), (2, 2, 1))
#: The decomposition fairchem's OMat24/MPtrj configs apply to the stress (``decompose_tensor``).
STRESS_PARTS = {"stress_isotropic": 0, "stress_anisotropic": 2}


class MissingPackageError(ImportError):
    """A package needed to write ``.aselmdb`` files is missing (one line naming it)."""


def _connect_aselmdb(path: Path) -> Any:
    """A new, writable ``.aselmdb`` database at ``path`` (replacing it)."""
    import ase.db

    try:
        import ase_db_backends.aselmdb  # noqa: F401  (ASE imports it only for .aselmdb)
    except ModuleNotFoundError:
        raise MissingPackageError(
            f"{path}: writing .aselmdb files needs the package ase-db-backends "
            "(pip install ase-db-backends)"
        ) from None
    for stale in (path, Path(f"{path}-lock")):
        if stale.exists():
            stale.unlink()
    return ase.db.connect(str(path), type="aselmdb", use_lock_file=False)


def alloy_pairs(metals: tuple[str, ...]) -> list[tuple[str, str]]:
    """Every unordered pair of distinct metals, in a fixed order."""
    return [(a, b) for i, a in enumerate(metals) for b in metals[i + 1 :]]


def make_structure(
    seed: int,
    index: int,
    metals: tuple[str, ...],
    alloy_frac: float = DEFAULT_ALLOY_FRAC,
    max_strain: float = DEFAULT_MAX_STRAIN,
    max_rattle: float = DEFAULT_MAX_RATTLE,
) -> tuple[Atoms, dict[str, Any]]:
    """Structure ``index`` of ``seed``, with EMT energy, forces and stress attached.

    A cubic fcc supercell (Vegard's-law lattice constant from ASE's reference states for an
    alloy A_(1-x) B_x with x in {1/4, 1/2, 3/4} on random sites), deformed by ``cell (I + ε)``
    with ε symmetric, ε_ab ~ U(-max_strain, max_strain), then every atom displaced by
    N(0, s² I_3) with s ~ U(0, max_rattle) Å.

    Returns:
        (atoms with a ``SinglePointCalculator`` holding the labels, description of the draw).
    """
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.data import atomic_numbers, reference_states

    rng = np.random.default_rng(np.random.SeedSequence([seed, 11, index]))
    pairs = alloy_pairs(metals)
    repeat = SUPERCELLS[int(rng.integers(len(SUPERCELLS)))]
    if pairs and rng.random() < alloy_frac:
        host, other = pairs[int(rng.integers(len(pairs)))]
        fraction = float(rng.choice([0.25, 0.5, 0.75]))
    else:
        host, other, fraction = metals[int(rng.integers(len(metals)))], None, 0.0

    def lattice(symbol: str) -> float:
        return float(reference_states[atomic_numbers[symbol]]["a"])

    a = (
        lattice(host)
        if other is None
        else (1 - fraction) * lattice(host) + fraction * lattice(other)
    )
    atoms = bulk(host, "fcc", a=a, cubic=True).repeat(repeat)
    if other is not None:
        symbols = np.array(atoms.get_chemical_symbols())
        count = max(1, round(fraction * len(atoms)))
        symbols[rng.permutation(len(atoms))[:count]] = other
        atoms.set_chemical_symbols(symbols.tolist())
    strain = rng.uniform(-max_strain, max_strain, size=(3, 3))
    strain = (strain + strain.T) / 2
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    rattle = float(rng.uniform(0.0, max_rattle))
    atoms.positions = atoms.positions + rng.normal(0.0, rattle, size=(len(atoms), 3))
    atoms.wrap()

    atoms.calc = EMT()
    energy = float(atoms.get_potential_energy())
    forces = atoms.get_forces()
    stress = atoms.get_stress()  # Voigt order (xx, yy, zz, yz, xz, xy), eV/Å³, as ASE stores it
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, stress=stress)
    info = {
        "composition": atoms.get_chemical_formula(),
        "host": host,
        "other": other or "",
        "fraction": fraction,
        "strain_max": float(np.abs(strain).max()),
        "rattle": rattle,
    }
    return atoms, info


def split_indices(
    structures: int, seed: int, val_frac: float, test_frac: float
) -> dict[str, np.ndarray]:
    """Structure indices per split from a seeded permutation (sorted within each split)."""
    _, n_val, n_test = split_counts(structures, val_frac, test_frac)
    perm = np.random.default_rng(np.random.SeedSequence([seed, 13])).permutation(structures)
    return {
        "test": np.sort(perm[:n_test]),
        "val": np.sort(perm[n_test : n_test + n_val]),
        "train": np.sort(perm[n_test + n_val :]),
    }


def write_split(directory: Path, rows: list[tuple[Atoms, dict[str, Any]]], sids: list[int]) -> Path:
    """Write ``rows`` to ``directory/data.aselmdb`` in one transaction, plus ``metadata.npz``.

    Each row keeps its labels as calculator results (``a2g_args: {r_energy, r_forces,
    r_stress}``), its ``sid`` in the row's ``data`` (fairchem puts ``data`` into ``atoms.info``,
    where it reads ``sid``) and the draw as key-value pairs (for people, not read by fairchem).
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / DB_NAME
    with _connect_aselmdb(path) as db:
        for (atoms, info), sid in zip(rows, sids, strict=True):
            db.write(atoms, key_value_pairs=info, data={"sid": int(sid)})
    lock = Path(f"{path}-lock")
    if lock.exists():
        lock.unlink()
    natoms = np.array([len(atoms) for atoms, _ in rows], dtype=np.int32)
    np.savez(directory / METADATA_NAME, natoms=natoms)
    return path


def stress_parts(stress: np.ndarray) -> dict[str, np.ndarray]:
    """fairchem's ``decompose_tensor`` of (S, 3, 3) stresses: ``stress_isotropic`` (S, 1) and
    ``stress_anisotropic`` (S, 5), in the stress's unit (its change-of-basis matrix)."""
    import torch
    from fairchem.core.common.utils import cg_change_mat

    flat = torch.from_numpy(np.asarray(stress, dtype=np.float32).reshape(-1, 9))
    irreps = torch.einsum("ab,cb->ca", cg_change_mat(2), flat).numpy().astype(np.float64)
    return {"stress_isotropic": irreps[:, :1], "stress_anisotropic": irreps[:, 4:9]}


def rmsd_stats(values: np.ndarray) -> tuple[float, float]:
    """(mean, rmsd) as fairchem's ``fit_normalizers`` computes them for one target: the mean of
    every component, the root of the summed squared deviations over the number of rows (the
    correction fairchem's fit uses once the forces mean is fixed at 0)."""
    rows = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    mean = float(rows.mean())
    return mean, float(np.sqrt(((rows - mean) ** 2).sum() / max(len(rows), 1)))


def _write_stats(
    vdir: Path, rows: list[tuple[Atoms, dict[str, Any]]], extra: dict[str, Any]
) -> dict:
    """Fit element references and normalizers on the train rows; write them and stats.json."""
    energies = np.array([atoms.get_potential_energy() for atoms, _ in rows])
    forces = np.concatenate([atoms.get_forces() for atoms, _ in rows]).astype(np.float32)
    stress = np.stack([atoms.get_stress(voigt=False) for atoms, _ in rows])
    counts = composition_matrix([atoms.numbers for atoms, _ in rows])
    coeff = fit_element_references(counts, energies)
    np.savez(vdir / "element_references.npz", element_references=coeff, coeff=coeff)
    referenced = energies - counts @ coeff
    norm = energy_force_stats(referenced, forces)
    parts = stress_parts(stress)
    stats: dict[str, Any] = {
        "variant": "bulk",
        "split": "train",
        **extra,
        "num_structures": len(rows),
        "num_atoms": int(forces.shape[0]),
        "energy_target": "referenced: total energy minus element references",
        "energy_mean": norm["energy_mean"],
        "energy_std": norm["energy_std"],
        "force_mean": 0.0,
        "force_std": norm["force_std"],
        "stress_frobenius_max": float(np.sqrt((stress**2).sum(axis=(1, 2))).max()),
        "element_references": {
            "file": "element_references.npz",
            "units": "eV/atom, indexed by atomic number",
            "fit_mae_eV": float(np.abs(referenced).mean()),
            "nonzero": {str(z): float(coeff[z]) for z in np.flatnonzero(coeff)},
        },
        "units": {"energy": "eV", "force": "eV/Angstrom", "stress": "eV/Angstrom^3"},
    }
    normalizer: dict[str, Any] = energy_force_normalizer(stats)
    for name, values in parts.items():
        mean, rmsd = rmsd_stats(values)
        normalizer[name] = {"mean": mean, "rmsd": rmsd}
        stats[f"{name}_mean"], stats[f"{name}_rmsd"] = mean, rmsd
    transforms = {
        "normalizer": normalizer,
        "element_references": {
            "energy": {"file": str((vdir / "element_references.npz").resolve())}
        },
    }
    header = (
        "# bulk train-split normalizers written by fairchem_dens.data bulk (include from a "
        "fairchem 1.10 config).\n"
        "# energy: referenced (total minus element references), eV; forces eV/A; stress parts "
        "eV/A^3 (fairchem's decompose_tensor).\n"
    )
    write_stats_files(vdir, stats, transforms, header)
    return stats


def _check_number(name: str, value: Any, low: float, high: float | None = None) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (high is not None and value > high):
        bound = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")
    return float(value)


def generate_bulk(
    out: str | os.PathLike,
    structures: int = DEFAULT_STRUCTURES,
    seed: int = 0,
    metals: str | list[str] | tuple[str, ...] | None = None,
    alloy_frac: float = DEFAULT_ALLOY_FRAC,
    max_strain: float = DEFAULT_MAX_STRAIN,
    max_rattle: float = DEFAULT_MAX_RATTLE,
    val_frac: float = DEFAULT_VAL_FRAC,
    test_frac: float = DEFAULT_TEST_FRAC,
) -> dict[str, Any]:
    """Write strained, rattled EMT fcc bulk cells with energy, forces and stress as ``.aselmdb``.

    Args:
        out: output root; writes ``out/bulk/...`` (see the module docstring).
        structures: number of structures over all splits (split by a seeded permutation).
        seed: non-negative seed; structure ``k`` depends only on ``(seed, k)``.
        metals: fcc metals to draw from (comma string or sequence; EMT-supported only).
        alloy_frac: fraction of binary alloys (needs at least two metals).
        max_strain: largest |ε_ab| of the symmetric strain.
        max_rattle: largest rattle std in Å.
        val_frac, test_frac: fractions of structures for the val/test splits.

    Returns:
        Summary: ``{"frames": {split: n}, "paths": {split: str}, "stats": {...},
        "time_s": float, "args": {...}}``.

    Raises:
        ValueError: one line for any invalid argument.
        MissingPackageError: one line when ase-db-backends is not installed.
    """
    if isinstance(structures, bool) or not isinstance(structures, (int, np.integer)):
        raise ValueError(f"structures must be an integer >= 1, got {structures!r}")
    if structures < 1:
        raise ValueError(f"structures must be an integer >= 1, got {structures!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    metal_tuple = parse_metals(metals)
    alloy_frac = _check_number("alloy_frac", alloy_frac, 0.0, 1.0)
    max_strain = _check_number("max_strain", max_strain, 0.0, 0.5)
    max_rattle = _check_number("max_rattle", max_rattle, 0.0, 1.0)
    splits = split_indices(int(structures), int(seed), val_frac, test_frac)
    vdir = check_writable(Path(out) / "bulk")

    t0 = time.perf_counter()
    made = [
        make_structure(int(seed), k, metal_tuple, alloy_frac, max_strain, max_rattle)
        for k in range(int(structures))
    ]
    summary: dict[str, Any] = {"frames": {}, "paths": {}}
    for split in SPLITS:
        rows = [made[k] for k in splits[split]]
        summary["paths"][split] = str(write_split(vdir / split, rows, splits[split].tolist()))
        summary["frames"][split] = len(rows)
    extra = {
        "seed": int(seed),
        "structures": int(structures),
        "metals": list(metal_tuple),
        "alloy_frac": alloy_frac,
        "max_strain": max_strain,
        "max_rattle_A": max_rattle,
    }
    summary["stats"] = _write_stats(vdir, [made[k] for k in splits["train"]], extra)
    summary["time_s"] = time.perf_counter() - t0
    summary["args"] = {"out": str(out), **extra, "val_frac": val_frac, "test_frac": test_frac}
    return summary


# ---- command line: `python -m fairchem_dens.data bulk ...` ------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``bulk`` subcommand's arguments to ``parser`` (a subparser or a parser)."""
    from .cli import _fraction, nonneg_int, positive_int
    from .options import DEFAULT_METALS, EMT_METALS

    def bounded(name: str, high: float) -> Any:
        def parse(text: str) -> float:
            try:
                return _check_number(name, float(text), 0.0, high)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected a number in [0, {high:g}], got {text!r}"
                ) from None

        return parse

    parser.add_argument("--out", required=True, help="output root (writes OUT/bulk)")
    parser.add_argument(
        "--structures", type=positive_int, default=DEFAULT_STRUCTURES, help="over all splits"
    )
    parser.add_argument("--seed", type=nonneg_int, default=0)
    parser.add_argument(
        "--metals",
        default=",".join(DEFAULT_METALS),
        help=f"comma-separated fcc metals, from {','.join(EMT_METALS)}",
    )
    parser.add_argument("--alloy-frac", type=bounded("alloy_frac", 1.0), default=DEFAULT_ALLOY_FRAC)
    parser.add_argument(
        "--max-strain",
        type=bounded("max_strain", 0.5),
        default=DEFAULT_MAX_STRAIN,
        help="largest |strain component|",
    )
    parser.add_argument(
        "--max-rattle",
        type=bounded("max_rattle", 1.0),
        default=DEFAULT_MAX_RATTLE,
        help="largest rattle std (A)",
    )
    parser.add_argument("--val-frac", type=_fraction, default=DEFAULT_VAL_FRAC)
    parser.add_argument("--test-frac", type=_fraction, default=DEFAULT_TEST_FRAC)
    return parser


def build_parser(prog: str = "fairchem_dens.data bulk") -> argparse.ArgumentParser:
    """A stand-alone parser of the ``bulk`` subcommand (one-line errors)."""
    from .cli import OneLineParser

    parser = OneLineParser(
        prog=prog,
        description="Generate strained, rattled EMT fcc bulk cells with energy, forces and "
        "stress as .aselmdb files (fairchem's ase_db format).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    return add_arguments(parser)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Generate from parsed ``args``; every error is one ``parser.error`` line."""
    try:
        parse_metals(args.metals)
    except ValueError as err:
        parser.error(f"argument --metals: {err}")
    try:
        split_counts(args.structures, args.val_frac, args.test_frac)
    except ValueError:
        parser.error(
            f"arguments --val-frac {args.val_frac:g} --test-frac {args.test_frac:g} leave no "
            f"train structures out of --structures {args.structures}"
        )
    try:
        check_writable(args.out)
    except ValueError as err:
        parser.error(f"argument --out: {err}")
    try:
        summary = generate_bulk(
            out=args.out,
            structures=args.structures,
            seed=args.seed,
            metals=args.metals,
            alloy_frac=args.alloy_frac,
            max_strain=args.max_strain,
            max_rattle=args.max_rattle,
            val_frac=args.val_frac,
            test_frac=args.test_frac,
        )
    except (ValueError, MissingPackageError) as err:
        parser.error(str(err))
    except OSError as err:
        parser.error(f"cannot write output: {err}")
    frames = summary["frames"]
    print(
        f"bulk: {args.structures} structures, train {frames['train']} / val {frames['val']} / "
        f"test {frames['test']}; largest train stress norm "
        f"{summary['stats']['stress_frobenius_max']:.3g} eV/A^3"
    )
    print(f"wrote {Path(args.out) / 'bulk'} in {summary['time_s']:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fairchem_dens.data bulk ARGS``; returns the exit status."""
    parser = build_parser()
    return run(parser.parse_args(sys.argv[1:] if argv is None else argv), parser)
