"""The DeNS dataset on fairchem's ASE-DB format (``.aselmdb``, OMat24/MPtrj style): the parent's
structures when inactive, the same draws as the LMDB dataset, per-structure opt-outs (flag and
skip list) over many draws, the stress filter, and one-line errors for bad data."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from ase.db import connect
from fairchem.core.datasets import AseDBDataset
from fairchem.core.datasets.lmdb_dataset import data_list_collater
from torch.utils.data import DataLoader

from fairchem_dens import keys
from fairchem_dens.config import DeNSConfig, DeNSConfigError
from fairchem_dens.data.bulk import DB_NAME
from fairchem_dens.data.lmdb_io import write_lmdb
from fairchem_dens.datasets import (
    DeNSAseDBDataset,
    DeNSLmdbDataset,
    DeNSSourceError,
    MissingPackageError,
)
from fairchem_dens.noise import Status, stress_norm
from fairchem_dens.testing import close_lmdb

A2G = {"r_energy": True, "r_forces": True, "r_stress": True}
FORCE_STD = 0.4
EPOCHS = 12  # draws per structure in the statistics tests


def asedb_config(src, **a2g):
    return {"src": str(src), "a2g_args": {**A2G, **a2g}}


@pytest.fixture(scope="module")
def plain(bulk_data):
    """Every training structure as fairchem's own AseDBDataset reads it."""
    dataset = AseDBDataset(asedb_config(bulk_data / "train"))
    structures = [dataset[i] for i in range(len(dataset))]
    close_lmdb(dataset)
    return structures


@pytest.fixture
def ours(bulk_data):
    dataset = DeNSAseDBDataset(asedb_config(bulk_data / "train"))
    yield dataset
    close_lmdb(dataset)


@pytest.fixture(scope="module")
def flagged(bulk_data, tmp_path_factory):
    """The train split rewritten with an ``md`` entry in each row's data: 1 on every third row
    (the DeNS authors' flag for OC20's MD frames)."""
    rows = copy_rows(bulk_data)
    path = tmp_path_factory.mktemp("flagged") / DB_NAME
    with connect(str(path), type="aselmdb", use_lock_file=False) as db:
        for i, (atoms, data) in enumerate(rows):
            db.write(atoms, data={**data, "md": int(i % 3 == 0)})
    return path, np.arange(len(rows)) % 3 == 0


def statuses(dataset, epochs=EPOCHS):
    """(epochs, n) statuses and whether any atom moved, over ``epochs`` epochs."""
    status, moved = [], []
    for epoch in range(epochs):
        dataset.set_dens_epoch(epoch)
        items = [dataset[i] for i in range(len(dataset))]
        status.append([int(d[keys.DENS_STATUS]) for d in items])
        moved.append([bool(d[keys.DENS_MASK].any()) for d in items])
    return np.array(status), np.array(moved)


# ---- the dataset ---------------------------------------------------------------------------


def test_inactive_dataset_equals_fairchem_parent(ours, plain):
    assert not ours.dens_enabled and len(ours) == len(plain)
    for i in range(len(ours)):
        a, b = ours[i], plain[i]
        assert not any(k in a for k in keys.ALL_FIELDS)
        assert torch.equal(a.pos, b.pos) and torch.equal(a.forces, b.forces)
        assert torch.equal(a.stress, b.stress) and a.energy == b.energy


def test_corrupted_structure_fields(ours, plain):
    ours.enable_dens(DeNSConfig(prob=0.5, sigma=0.1), seed=0, force_std=FORCE_STD)
    found = set()
    for i in range(len(ours)):
        data, original = ours[i], plain[i]
        mask, status = data[keys.DENS_MASK], int(data[keys.DENS_STATUS])
        found.add(status)
        assert torch.equal((data.pos - original.pos).abs().sum(-1) > 0, mask)
        if status == Status.DENS:
            assert mask.all()  # bulk: every atom is free, r_DeNS = 1
            noise = data.pos - original.pos
            assert torch.allclose(data[keys.DENS_TARGET] * 0.1, noise, atol=1e-5)  # Eq. 4
        expected = original.forces / FORCE_STD * mask[:, None]  # Alg. 1 l.24
        assert torch.allclose(data[keys.DENS_FORCE_INPUT], expected)
        assert torch.equal(data.stress, original.stress) and data.energy == original.energy
    assert found == {Status.DENS, Status.ORIGINAL}


def test_same_draws_as_the_lmdb_dataset_for_the_same_structures(bulk_data, plain, tmp_path):
    """The same structures in an OC20-style LMDB and in the .aselmdb, with the same settings
    (filters and opt-out flag included) and seed: the same corruption, structure by structure."""
    entries = []
    for i, data in enumerate(plain):
        data = data.clone()
        data.md = int(i % 4 == 0)
        entries.append(data)
    write_lmdb(tmp_path / "lmdb", entries)
    lmdb_dataset = DeNSLmdbDataset({"src": str(tmp_path / "lmdb")})
    flags = None
    norms = np.array([stress_norm(d.stress.numpy()) for d in plain])
    config = DeNSConfig(
        prob=0.6, corrupt_ratio=0.7, max_stress_norm=float(np.median(norms)), min_num_atoms=5
    )
    try:
        flags = asedb_flagged(bulk_data, tmp_path, [int(i % 4 == 0) for i in range(len(plain))])
        for dataset in (lmdb_dataset, flags):
            dataset.enable_dens(config, seed=5, force_std=FORCE_STD)
            dataset.set_dens_epoch(3)
        seen = set()
        for i in range(len(plain)):
            a, b = lmdb_dataset[i], flags[i]
            seen.add(int(a[keys.DENS_STATUS]))
            for name in keys.ALL_FIELDS:
                assert torch.equal(a[name], b[name]), (i, name)
            assert torch.equal(a.pos, b.pos)
        assert {Status.DENS, Status.OPT_OUT, Status.MAX_STRESS, Status.MIN_ATOMS} <= seen
    finally:
        close_lmdb(lmdb_dataset)
        close_lmdb(flags)


def copy_rows(bulk_data):
    """(atoms, data) of every row of the generated train split."""
    src = connect(str(bulk_data / "train" / DB_NAME), readonly=True, use_lock_file=False)
    rows = [(row.toatoms(), row.data) for row in src.select()]
    src.close()
    return rows


def asedb_flagged(bulk_data, tmp_path, flags):
    """A DeNS ASE-DB dataset over a copy of the train rows with ``md`` = ``flags``."""
    rows = copy_rows(bulk_data)
    path = tmp_path / "flags" / DB_NAME
    path.parent.mkdir()
    with connect(str(path), type="aselmdb", use_lock_file=False) as db:
        for (atoms, data), flag in zip(rows, flags, strict=True):
            db.write(atoms, data={**data, "md": flag})
    return DeNSAseDBDataset(asedb_config(path, r_data_keys=["md"]))


def collect(dataset, workers):
    loader = DataLoader(dataset, batch_size=5, num_workers=workers, collate_fn=data_list_collater)
    return [batch.pos for batch in loader]


def test_same_corruption_with_0_or_2_workers_and_per_epoch(ours):
    ours.enable_dens(DeNSConfig(prob=0.5, sigma=0.1), seed=3, force_std=FORCE_STD)
    ours.set_dens_epoch(2)
    serial, parallel = collect(ours, 0), collect(ours, 2)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))
    ours.set_dens_epoch(3)
    assert not all(torch.equal(a, b) for a, b in zip(serial, collect(ours, 0), strict=True))


# ---- per-structure opt-outs ------------------------------------------------------------------


def assert_never_corrupted_and_others_at_p(status, moved, skipped, prob):
    """Skipped structures: OPT_OUT in every epoch and never moved; the others are DeNS
    structures with frequency p (binomial, > 4.5 σ margin)."""
    assert (status[:, skipped] == Status.OPT_OUT).all() and not moved[:, skipped].any()
    others = status[:, ~skipped]
    assert not (others == Status.OPT_OUT).any()
    fraction, n = (others == Status.DENS).mean(), others.size
    assert abs(fraction - prob) < 4.5 * np.sqrt(prob * (1 - prob) / n), (fraction, n)


def test_flagged_structures_are_never_corrupted(flagged):
    path, md = flagged
    dataset = DeNSAseDBDataset(asedb_config(path, r_data_keys=["md"]))
    try:
        dataset.enable_dens(DeNSConfig(prob=0.5, sigma=0.1), seed=1)
        status, moved = statuses(dataset)
        assert_never_corrupted_and_others_at_p(status, moved, md, 0.5)
        # skip_flag: null ignores the field
        dataset.enable_dens(DeNSConfig(prob=0.5, sigma=0.1, skip_flag=None), seed=1)
        status, _ = statuses(dataset, epochs=4)
        assert (status[:, md] == Status.DENS).any() and not (status == Status.OPT_OUT).any()
    finally:
        close_lmdb(dataset)


def test_skip_list_structures_are_never_corrupted(ours, tmp_path):
    skipped = np.zeros(len(ours), dtype=bool)
    skipped[[0, 3, 4, 17, len(ours) - 1]] = True
    listed = [str(i) for i in np.flatnonzero(skipped)]
    path = tmp_path / "skip.txt"
    path.write_text("# MD frames\n" + "\n".join(listed[:2]) + "\n\n" + "\n".join(listed[2:]) + "\n")
    ours.enable_dens(DeNSConfig(prob=0.5, sigma=0.1, skip_list=str(path)), seed=2)
    status, moved = statuses(ours)
    assert_never_corrupted_and_others_at_p(status, moved, skipped, 0.5)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1\n99999\n", r"skip\.txt'.*names 1 unknown indices \(e\.g\. 99999\).*indices 0\.\."),
        ("-1\n", r"names 1 unknown indices \(e\.g\. -1\)"),
        ("1\nmp-1234\n", r"skip\.txt'.*line 2 'mp-1234' is not a dataset index"),
    ],
)
def test_bad_skip_list_is_one_line_naming_the_file(ours, tmp_path, content, message):
    path = tmp_path / "skip.txt"
    path.write_text(content)
    with pytest.raises(DeNSSourceError, match=r"^optim\.dens\.skip_list=.*" + message) as error:
        ours.enable_dens(DeNSConfig(skip_list=str(path)), seed=0)
    assert "\n" not in str(error.value) and not ours.dens_enabled


def test_missing_skip_list_file_is_a_config_error(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DeNSConfigError, match=r"^optim\.dens\.skip_list='.*nope\.txt': file not"):
        DeNSConfig.from_optim({"dens": {"skip_list": str(missing)}})


# ---- the stress filter -----------------------------------------------------------------------


def test_max_stress_norm_filters_exactly_the_structures_above_it(ours, plain):
    """Frobenius norm of the label in eV/Å³; ineligible structures are never corrupted."""
    norms = np.array([float(torch.linalg.matrix_norm(d.stress)) for d in plain])
    threshold = float(np.median(norms))
    assert (norms > threshold).any() and (norms <= threshold).any()
    ours.enable_dens(DeNSConfig(prob=1.0, sigma=0.1, max_stress_norm=threshold), seed=0)
    status = np.array([int(ours[i][keys.DENS_STATUS]) for i in range(len(ours))])
    assert np.array_equal(status == Status.MAX_STRESS, norms > threshold)
    assert np.all(status[norms <= threshold] == Status.DENS)


def test_max_stress_norm_without_stress_labels_is_one_line(bulk_data):
    dataset = DeNSAseDBDataset(asedb_config(bulk_data / "train", r_stress=False))
    try:
        dataset.enable_dens(DeNSConfig(), seed=0)  # no stress needed without the filter
        with pytest.raises(
            DeNSSourceError, match=r"^optim\.dens\.max_stress_norm: .*train entry 0 has no 'stress'"
        ) as error:
            dataset.enable_dens(DeNSConfig(max_stress_norm=0.1), seed=0)
        assert "\n" not in str(error.value)
    finally:
        close_lmdb(dataset)


def test_dataset_without_forces_is_one_line(bulk_data):
    dataset = DeNSAseDBDataset(asedb_config(bulk_data / "train", r_forces=False))
    try:
        with pytest.raises(
            DeNSSourceError, match=r"train: entry 0 has no 'force' or 'forces' field.*r_forces"
        ) as error:
            dataset.enable_dens(DeNSConfig(), seed=0)
        assert "\n" not in str(error.value)
    finally:
        close_lmdb(dataset)


def test_missing_ase_db_backends_is_one_line_naming_the_package(bulk_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "ase_db_backends", None)
    monkeypatch.setitem(sys.modules, "ase_db_backends.aselmdb", None)
    with pytest.raises(
        MissingPackageError, match=r"data\.aselmdb'.*needs the package ase-db-"
    ) as e:
        DeNSAseDBDataset(asedb_config(bulk_data / "train" / DB_NAME))
    assert "\n" not in str(e.value) and "pip install ase-db-backends" in str(e.value)
