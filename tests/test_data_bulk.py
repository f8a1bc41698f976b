"""The EMT bulk generator (``fairchem_dens.data.bulk``): EMT labels with stress in eV/Å³, rows that
fairchem's ``ase_db`` reads, normalizers as fairchem fits them, determinism per seed, CLI errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from ase.calculators.emt import EMT
from ase.db import connect

from fairchem_dens.data.bulk import (
    DB_NAME,
    MissingPackageError,
    generate_bulk,
    make_structure,
)
from fairchem_dens.testing import close_lmdb

A2G = {"r_energy": True, "r_forces": True, "r_stress": True}
DECOMPOSE = {
    "decompose_tensor": {
        "tensor": "stress",
        "rank": 2,
        "decomposition": {
            "stress_isotropic": {"irrep_dim": 0},
            "stress_anisotropic": {"irrep_dim": 2},
        },
    }
}


def read_rows(path):
    """(numbers, positions, cell, energy, forces, stress, sid) of every row of an .aselmdb."""
    db = connect(str(path), type="aselmdb", readonly=True, use_lock_file=False)
    try:
        rows = []
        for row in db.select():
            rows.append(
                (
                    row.numbers.copy(),
                    row.positions.copy(),
                    np.asarray(row.cell).copy(),
                    float(row.energy),
                    row.forces.copy(),
                    row.stress.copy(),
                    int(row.data["sid"]),
                )
            )
        return rows
    finally:
        db.close()


def fairchem_items(split_dir, transforms=None):
    """Every structure as fairchem's own AseDBDataset reads it (closed afterwards)."""
    from fairchem.core.datasets import AseDBDataset

    config = {"src": str(split_dir), "a2g_args": dict(A2G), "transforms": transforms or {}}
    dataset = AseDBDataset(config)
    items = [dataset[i] for i in range(len(dataset))]
    close_lmdb(dataset)
    return items


def test_labels_are_emts_and_stress_is_in_ev_per_cubic_angstrom(bulk_data):
    rows = read_rows(bulk_data / "train" / DB_NAME)
    assert len(rows) > 30
    strained = 0
    for numbers, positions, cell, energy, forces, stress, _ in rows[:8]:
        from ase import Atoms

        atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=True)
        atoms.calc = EMT()
        assert energy == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(forces, atoms.get_forces(), atol=1e-9)
        np.testing.assert_allclose(stress, atoms.get_stress(voigt=True), atol=1e-12)  # eV/Å³
        strained += np.abs(stress).max() > 1e-3  # > 0.16 GPa: the cells are strained
    assert strained >= 6
    sizes = {len(r[0]) for r in rows}
    assert sizes <= {4, 8, 16} and len(sizes) > 1
    assert any(len(set(r[0])) == 2 for r in rows)  # binary alloys
    assert any(len(set(r[0])) == 1 for r in rows)  # elemental cells


def test_fairchem_ase_db_reads_every_split_with_labels_and_sids(bulk_data):
    seen = set()
    for split in ("train", "val", "test"):
        rows = read_rows(bulk_data / split / DB_NAME)
        items = fairchem_items(bulk_data / split)
        assert len(items) == len(rows) > 0
        natoms = np.load(bulk_data / split / "metadata.npz")["natoms"]
        assert list(natoms) == [len(r[0]) for r in rows]
        for item, row in zip(items, rows, strict=True):
            assert item.stress.shape == (3, 3)
            assert torch.allclose(item.forces, torch.from_numpy(row[4]).float())
            assert item.sid == row[6] and (item.fixed == 0).all()
        seen |= {r[6] for r in rows}
    assert seen == set(range(48))  # the splits partition the structures


def test_normalizers_are_fairchems_fit_of_the_train_split(bulk_data):
    """The written normalizers and element references equal what fairchem's own fits
    (``fit_normalizers`` / ``fit_linear_references``, as fairchem's MPtrj config runs them: forces
    with mean 0, then the stress parts) compute on the train split as its dataset delivers it."""
    from fairchem.core.datasets import AseDBDataset
    from fairchem.core.modules.normalization.element_references import fit_linear_references
    from fairchem.core.modules.normalization.normalizer import fit_normalizers

    written = yaml.safe_load((bulk_data / "normalizers.yml").read_text())["dataset"]["train"]
    config = {"src": str(bulk_data / "train"), "a2g_args": dict(A2G), "transforms": DECOMPOSE}
    dataset = AseDBDataset(config)
    try:
        targets = ["forces", "stress_isotropic", "stress_anisotropic"]
        fitted = fit_normalizers(
            targets, dataset, batch_size=8, override_values={"forces": {"mean": 0.0}}
        )
        references = fit_linear_references(["energy"], dataset, batch_size=8, log_metrics=False)
        items = [dataset[i] for i in range(len(dataset))]
    finally:
        close_lmdb(dataset)
    normalizer = written["transforms"]["normalizer"]
    for name in targets:
        expected = {"mean": float(fitted[name].mean), "rmsd": float(fitted[name].rmsd)}
        assert normalizer[name] == pytest.approx(expected, rel=1e-5, abs=1e-9), name
        assert expected["rmsd"] > 0
    coeff = np.load(written["transforms"]["element_references"]["energy"]["file"])["coeff"]
    fairchem_coeff = references["energy"].element_references.numpy()
    np.testing.assert_allclose(coeff[: fairchem_coeff.size], fairchem_coeff, rtol=1e-5, atol=1e-6)
    energies = np.array([float(i.energy) for i in items])
    counts = [np.bincount(i.atomic_numbers.long().numpy(), minlength=coeff.size) for i in items]
    referenced = energies - np.stack(counts) @ coeff
    assert normalizer["energy"]["mean"] == pytest.approx(referenced.mean(), abs=1e-9)
    assert normalizer["energy"]["rmsd"] == pytest.approx(referenced.std(ddof=1), rel=1e-9)
    present = np.stack(counts)[:, np.flatnonzero(np.stack(counts).sum(0))]
    np.testing.assert_allclose(present.T @ referenced, 0.0, atol=1e-6)  # least squares residual


def test_deterministic_per_seed_and_structure(tmp_path):
    metals = ("Cu", "Au", "Pt")
    a, _ = make_structure(3, 5, metals)
    b, _ = make_structure(3, 5, metals)
    c, _ = make_structure(4, 5, metals)
    assert (
        np.array_equal(a.positions, b.positions)
        and a.get_potential_energy() == b.get_potential_energy()
    )
    assert not np.array_equal(a.positions, c.positions) or len(a) != len(c)
    generate_bulk(tmp_path / "x", structures=10, seed=1, metals="Cu,Au")
    generate_bulk(tmp_path / "y", structures=10, seed=1, metals="Cu,Au")
    generate_bulk(tmp_path / "z", structures=10, seed=2, metals="Cu,Au")
    for split in ("train", "val", "test"):
        x, y = (read_rows(tmp_path / d / "bulk" / split / DB_NAME) for d in ("x", "y"))
        for rx, ry in zip(x, y, strict=True):
            for vx, vy in zip(rx, ry, strict=True):
                assert np.array_equal(vx, vy)
    x, z = (read_rows(tmp_path / d / "bulk" / "train" / DB_NAME) for d in ("x", "z"))
    assert not all(np.array_equal(rx[1], rz[1]) for rx, rz in zip(x, z, strict=False))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"structures": 0}, "structures must be an integer >= 1"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"metals": "Cu,Fe"}, "unknown metal 'Fe'"),
        ({"max_strain": 0.9}, r"max_strain must be a number in \[0, 0.5\]"),
        ({"structures": 2, "val_frac": 0.5, "test_frac": 0.5}, "leave no train systems"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        generate_bulk(tmp_path, **{"structures": 4, **kwargs})
    assert "\n" not in str(error.value)


def test_missing_ase_db_backends_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ase_db_backends", None)
    monkeypatch.setitem(sys.modules, "ase_db_backends.aselmdb", None)
    with pytest.raises(MissingPackageError, match=r"needs the package ase-db-backends") as error:
        generate_bulk(tmp_path, structures=4)
    assert "\n" not in str(error.value)


def run_module(*args):
    return subprocess.run(
        [sys.executable, "-m", "fairchem_dens.data", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_bulk_subcommand_writes_the_dataset(tmp_path):
    result = run_module("bulk", "--out", str(tmp_path), "--structures", "6", "--seed", "2")
    assert result.returncode == 0, result.stderr
    assert "bulk: 6 structures" in result.stdout
    assert (tmp_path / "bulk" / "train" / DB_NAME).is_file()
    assert (tmp_path / "bulk" / "normalizers.yml").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--structures", "0"], "argument --structures: expected a positive integer"),
        (["--metals", "Cu,Xx"], "argument --metals: unknown metal 'Xx'"),
        (["--max-rattle", "-1"], r"argument --max-rattle: expected a number in \[0, 1\]"),
        (["--val-frac", "0.6", "--test-frac", "0.6"], "arguments --val-frac 0.6 --test-frac 0.6"),
    ],
)
def test_cli_bad_arguments_are_one_line(tmp_path, args, message):
    import re

    result = run_module("bulk", "--out", str(tmp_path), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), result.stderr
