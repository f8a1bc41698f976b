"""Generate small OC20/OC22-format S2EF + IS2RE LMDB datasets from EMT relaxations.

See ``docs/data.md`` for the layout and fields. Entry point: :func:`generate`.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Data

from . import options
from .lmdb_io import write_lmdb
from .options import (
    DEFAULT_FMAX,
    DEFAULT_MAX_FORCE,
    DEFAULT_MAX_STEPS,
    DEFAULT_SYSTEMS,
    DEFAULT_TEST_FRAC,
    DEFAULT_VAL_FRAC,
    SPLITS,
    THREAD_ENV,
    VARIANTS,
    check_writable,
    parse_metals,
    split_counts,
)
from .stats import (
    composition_matrix,
    energy_force_normalizer,
    fit_element_references,
    normalizer_fields,
    write_stats_files,
)
from .systems import Trajectory, relax_system_star


@dataclass
class _VariantResult:
    """Book-keeping of one variant's generation."""

    frames: dict[str, int] = field(default_factory=dict)
    systems: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    subsampled_out: int = 0
    converged: int = 0


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def split_systems(
    systems: int, seed: int, val_frac: float, test_frac: float
) -> dict[str, np.ndarray]:
    """Assign system ids to splits by a seeded permutation (sizes from :func:`split_counts`).

    Returns:
        {"train"|"val"|"test": sorted int64 array of sids}.
    """
    _, n_val, n_test = split_counts(systems, val_frac, test_frac)
    perm = np.random.default_rng(np.random.SeedSequence([seed, 7])).permutation(systems)
    return {
        "test": np.sort(perm[:n_test]),
        "val": np.sort(perm[n_test : n_test + n_val]),
        "train": np.sort(perm[n_test + n_val :]),
    }


def select_frames(
    traj: Trajectory, max_force: float, frames_per_system_max: int | None
) -> tuple[np.ndarray, int, int]:
    """Indices of the frames of ``traj`` to keep.

    Frames whose largest per-atom force norm (all atoms, fixed ones included) exceeds
    ``max_force`` eV/Å are dropped; if more than ``frames_per_system_max`` remain, that many are
    kept evenly spaced along the trajectory (first and last kept).

    Returns:
        (kept frame indices (K,) int64, number dropped by the force threshold, number removed
        by subsampling).
    """
    fmax_per_frame = np.linalg.norm(traj.forces, axis=2).max(axis=1)  # (T,)
    ok = np.flatnonzero(fmax_per_frame <= max_force)
    dropped = len(fmax_per_frame) - len(ok)
    if frames_per_system_max is not None and len(ok) > frames_per_system_max:
        pick = np.unique(np.round(np.linspace(0, len(ok) - 1, frames_per_system_max)).astype(int))
        sub_out = len(ok) - len(pick)
        ok = ok[pick]
    else:
        sub_out = 0
    return ok.astype(np.int64), dropped, sub_out


def _static_fields(traj: Trajectory, oc22: bool) -> dict[str, Any]:
    """Per-system fields shared by all entries of ``traj``."""
    fields: dict[str, Any] = {
        "cell": torch.from_numpy(traj.cell.astype(np.float32)).view(1, 3, 3),
        "atomic_numbers": torch.from_numpy(traj.atomic_numbers.astype(np.float32)),
        "natoms": len(traj.atomic_numbers),
        "tags": torch.from_numpy(traj.tags.astype(np.int64)),
        "fixed": torch.from_numpy(traj.fixed.astype(np.float32)),
        "sid": int(traj.sid),
    }
    if oc22:
        # OC22LmdbDataset treats entries without `oc22` as OC20 adsorption energies.
        fields["oc22"] = 1
        fields["nads"] = 1
    return fields


def s2ef_entries(traj: Trajectory, frames: np.ndarray, labels: bool, oc22: bool) -> list[Data]:
    """S2EF Data objects for the given frames (``y``/``force`` only if ``labels``)."""
    static = _static_fields(traj, oc22)
    out = []
    for k in frames:
        d = Data(pos=torch.from_numpy(traj.positions[k].astype(np.float32)), **static)
        d.fid = int(k)
        if labels:
            d.y = float(traj.energies[k])
            d.force = torch.from_numpy(traj.forces[k].astype(np.float32))
        out.append(d)
    return out


def is2re_entry(traj: Trajectory, oc22: bool) -> Data:
    """IS2RE Data object: initial structure, ``y_init``, ``y_relaxed`` and ``pos_relaxed``."""
    d = Data(
        pos=torch.from_numpy(traj.positions[0].astype(np.float32)), **_static_fields(traj, oc22)
    )
    d.y_init = float(traj.energies[0])
    d.y_relaxed = float(traj.energies[-1])
    d.pos_relaxed = torch.from_numpy(traj.positions[-1].astype(np.float32))
    return d


def _relax_all(
    variants: tuple[str, ...],
    systems: int,
    seed: int,
    metals: tuple[str, ...],
    max_steps: int,
    fmax: float,
    workers: int,
) -> dict[str, list[Trajectory]]:
    """Relax systems 0..systems-1 of every variant.

    The relaxations run in this process only if ``workers == 1`` and BLAS was pinned to one
    thread before numpy loaded (the CLI does that); otherwise in ``workers`` spawned processes
    started with THREAD_ENV. Either way BLAS is single-threaded, so the result is the same.

    Returns:
        {variant: trajectories in sid order}; identical for any ``workers``.
    """
    args = [(seed, v, sid, metals, max_steps, fmax) for v in variants for sid in range(systems)]
    if workers == 1 and options.BLAS_PINNED:
        trajs = [relax_system_star(a) for a in args]
    else:
        # Spawned workers import numpy afresh with single-threaded BLAS (see THREAD_ENV).
        saved = {key: os.environ.get(key) for key in THREAD_ENV}
        os.environ.update(THREAD_ENV)
        try:
            pool = mp.get_context("spawn").Pool(min(workers, len(args)))
        finally:
            for key, val in saved.items():
                if val is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = val
        with pool:
            trajs = list(pool.imap(relax_system_star, args, chunksize=1))
    return {v: trajs[i * systems : (i + 1) * systems] for i, v in enumerate(variants)}


def _write_stats(
    vdir: Path,
    variant: str,
    trajs: list[Trajectory],
    train_frames: dict[int, np.ndarray],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write stats.json, normalizers.yml (and element_references.npz for oc22)."""
    energies = np.concatenate([trajs[s].energies[f] for s, f in train_frames.items()])
    if energies.size == 0:
        raise ValueError(
            f"{variant}: no train frames left after the max-force filter; raise --max-force"
        )
    forces = np.concatenate(
        [trajs[s].forces[f].astype(np.float32).reshape(-1, 3) for s, f in train_frames.items()]
    )
    stats: dict[str, Any] = {"variant": variant, "split": "train", **extra}
    stats["num_frames"] = int(energies.size)
    stats["num_atoms"] = int(forces.shape[0])
    normalizer_energy = energies
    elem_cfg = None
    if variant == "oc22":
        z_per_frame = [trajs[s].atomic_numbers for s, f in train_frames.items() for _ in f]
        counts = composition_matrix(z_per_frame)
        coeff = fit_element_references(counts, energies)
        np.savez(vdir / "element_references.npz", element_references=coeff, coeff=coeff)
        normalizer_energy = energies - counts @ coeff
        resid = normalizer_energy
        stats["element_references"] = {
            "file": "element_references.npz",
            "keys": ["element_references", "coeff"],
            "length": int(coeff.size),
            "units": "eV/atom, indexed by atomic number",
            "fit_mae_eV": float(np.abs(resid).mean()),
            "fit_rmse_eV": float(np.sqrt((resid**2).mean())),
            "nonzero": {str(z): float(coeff[z]) for z in np.flatnonzero(coeff)},
        }
        elem_cfg = {"energy": {"file": str((vdir / "element_references.npz").resolve())}}
        stats["energy_target"] = "referenced: total energy minus element references"
    else:
        stats["element_references"] = None
        stats["energy_target"] = "total energy"
    stats.update(normalizer_fields(normalizer_energy, forces, energies))
    stats["units"] = {"energy": "eV", "force": "eV/Angstrom"}
    transforms: dict[str, Any] = {"normalizer": energy_force_normalizer(stats)}
    if elem_cfg is not None:
        transforms["element_references"] = elem_cfg
    header = (
        f"# {variant} train-split normalizers written by fairchem_dens.data "
        "(include from a fairchem 1.10 config).\n"
        "# fairchem's create_normalizer takes mean/rmsd ('stdev' is its deprecated alias).\n"
    )
    write_stats_files(vdir, stats, transforms, header)
    return stats


def _write_variant(
    out: Path,
    variant: str,
    trajs: list[Trajectory],
    splits: dict[str, np.ndarray],
    seed: int,
    max_force: float,
    frames_per_system_max: int | None,
) -> dict[str, Any]:
    """Filter, split and write the trajectories of one variant; return its summary."""
    oc22 = variant == "oc22"
    systems = len(trajs)
    res = _VariantResult(converged=sum(t.converged for t in trajs))
    selected: dict[int, np.ndarray] = {}
    for t in trajs:
        keep, dropped, sub_out = select_frames(t, max_force, frames_per_system_max)
        selected[t.sid] = keep
        res.dropped += dropped
        res.subsampled_out += sub_out
    vdir = out / variant
    paths: dict[str, str] = {}
    for split in SPLITS:
        entries: list[Data] = []
        for sid in splits[split]:
            entries += s2ef_entries(trajs[sid], selected[sid], labels=split != "test", oc22=oc22)
        paths[split] = str(write_lmdb(vdir / split, entries))
        res.frames[split] = len(entries)
        res.systems[split] = len(splits[split])
    is2re_sids = np.sort(np.concatenate([splits["val"], splits["test"]]))
    paths["is2re"] = str(
        write_lmdb(vdir / "is2re", [is2re_entry(trajs[s], oc22) for s in is2re_sids])
    )
    res.frames["is2re"] = len(is2re_sids)
    res.systems["is2re"] = len(is2re_sids)
    train_frames = {int(s): selected[int(s)] for s in splits["train"]}
    extra = {
        "seed": seed,
        "systems": systems,
        "max_force_threshold": max_force,
        "dropped_frames": res.dropped,
    }
    stats = _write_stats(vdir, variant, trajs, train_frames, extra)
    return {
        "frames": res.frames,
        "systems": res.systems,
        "dropped": res.dropped,
        "subsampled_out": res.subsampled_out,
        "converged": res.converged,
        "paths": paths,
        "stats": stats,
        "descriptions": {t.sid: t.description for t in trajs},
    }


def generate(
    out: str | os.PathLike,
    variant: str = "both",
    systems: int = DEFAULT_SYSTEMS,
    seed: int = 0,
    max_steps: int = DEFAULT_MAX_STEPS,
    max_force: float = DEFAULT_MAX_FORCE,
    metals: str | list[str] | tuple[str, ...] | None = None,
    val_frac: float = DEFAULT_VAL_FRAC,
    test_frac: float = DEFAULT_TEST_FRAC,
    workers: int = 1,
    frames_per_system_max: int | None = None,
    fmax: float = DEFAULT_FMAX,
) -> dict[str, Any]:
    """Generate OC20- and/or OC22-format S2EF/IS2RE LMDBs from EMT BFGS relaxations.

    Args:
        out: output root; writes ``out/<variant>/{train,val,test,is2re}/data.lmdb`` (+
            ``metadata.npz``), ``out/<variant>/stats.json`` and ``normalizers.yml`` (and
            ``element_references.npz`` for oc22).
        variant: ``"oc20"`` (bottom layers fixed), ``"oc22"`` (all atoms free) or ``"both"``.
        systems: number of adsorbate+slab systems (relaxation trajectories) per variant.
        seed: non-negative seed; the output LMDB bytes depend only on the arguments.
        max_steps: maximum BFGS steps per system (at most ``max_steps + 1`` frames).
        max_force: frames whose largest per-atom force norm exceeds this (eV/Å) are dropped.
        metals: metals to draw slabs from (comma string or sequence; EMT-supported only).
        val_frac, test_frac: fractions of systems for the val/test splits (split by ``sid``).
        workers: worker processes for the relaxations (results do not depend on it).
        frames_per_system_max: keep at most this many evenly spaced frames per system.
        fmax: BFGS convergence threshold, eV/Å.

    Returns:
        Summary dict: ``{"oc20"|"oc22": {"frames", "systems", "dropped", "subsampled_out",
        "converged", "paths", "stats", "descriptions"}, "time_s": float, "args": {...}}``.

    Raises:
        ValueError: with a one-line message for any invalid argument.
    """
    if variant not in (*VARIANTS, "both"):
        raise ValueError(f"variant must be one of oc20, oc22, both, got {variant!r}")
    systems = _check_int("systems", systems, 1)
    seed = _check_int("seed", seed, 0)
    max_steps = _check_int("max_steps", max_steps, 1)
    workers = _check_int("workers", workers, 1)
    if frames_per_system_max is not None:
        frames_per_system_max = _check_int("frames_per_system_max", frames_per_system_max, 1)
    for name, val in (("max_force", max_force), ("fmax", fmax)):
        if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
            raise ValueError(f"{name} must be a positive number, got {val!r}")
    metal_tuple = parse_metals(metals)
    splits = split_systems(systems, seed, val_frac, test_frac)
    out_path = Path(out)
    check_writable(out_path)

    t0 = time.perf_counter()
    variants = VARIANTS if variant == "both" else (variant,)
    trajs = _relax_all(variants, systems, seed, metal_tuple, max_steps, float(fmax), workers)
    summary: dict[str, Any] = {}
    for v in variants:
        summary[v] = _write_variant(
            out_path, v, trajs[v], splits, seed, float(max_force), frames_per_system_max
        )
    summary["time_s"] = time.perf_counter() - t0
    summary["args"] = {
        "out": str(out_path),
        "variant": variant,
        "systems": systems,
        "seed": seed,
        "max_steps": max_steps,
        "max_force": float(max_force),
        "metals": list(metal_tuple),
        "val_frac": val_frac,
        "test_frac": test_frac,
        "workers": workers,
        "frames_per_system_max": frames_per_system_max,
        "fmax": float(fmax),
    }
    return summary
