"""The denoising datasets on generated LMDBs: what a corrupted structure carries (Alg. 1 l.7-27),
determinism across DataLoader workers and epochs, OC20 and OC22 modes, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fairchem.core.datasets import LmdbDataset
from fairchem.core.datasets.lmdb_dataset import data_list_collater
from torch.utils.data import DataLoader

from fairchem_dens import keys
from fairchem_dens.config import DeNSConfig
from fairchem_dens.datasets import DeNSLmdbDataset, DeNSOC22LmdbDataset, DeNSSourceError
from fairchem_dens.noise import Status
from fairchem_dens.testing import close_lmdb

FORCE_STD = 0.7


MAPPING = {"y": "energy", "force": "forces"}


@pytest.fixture(scope="module")
def plain(emt_data):
    """Every training structure as fairchem's own LmdbDataset reads it."""
    dataset = LmdbDataset({"src": str(emt_data / "oc20" / "train"), "key_mapping": MAPPING})
    structures = [dataset[i] for i in range(len(dataset))]
    close_lmdb(dataset)
    return structures


@pytest.fixture
def ours(emt_data):
    dataset = DeNSLmdbDataset({"src": str(emt_data / "oc20" / "train"), "key_mapping": MAPPING})
    yield dataset
    close_lmdb(dataset)


def test_inactive_dataset_equals_fairchem_parent(ours, plain):
    assert not ours.dens_enabled
    for i in range(len(ours)):
        a, b = ours[i], plain[i]
        assert not any(k in a for k in keys.ALL_FIELDS)
        assert torch.equal(a.pos, b.pos) and torch.equal(a.forces, b.forces)


def test_corrupted_structure_fields(ours, plain):
    ours.enable_dens(DeNSConfig(prob=0.5, sigma_high=0.5), seed=0, force_std=FORCE_STD)
    statuses = []
    for i in range(len(ours)):
        data, original = ours[i], plain[i]
        mask = data[keys.DENS_MASK]
        free = original.fixed == 0
        sigma = float(data[keys.DENS_SIGMA])
        statuses.append(int(data[keys.DENS_STATUS]))
        moved = (data.pos - original.pos).abs().sum(-1) > 0
        assert torch.equal(moved, mask)  # only corrupted atoms move
        assert not mask[~free].any()  # OC20 mode: fixed atoms are never corrupted
        if bool(data[keys.DENS_STRUCTURE]):
            assert torch.equal(mask, free)  # r_DeNS = 1: every free atom
            # Eq. 4 target: ε/σ with ε = p̃ − p
            assert torch.allclose(
                data[keys.DENS_TARGET] * sigma, data.pos - original.pos, atol=1e-5
            )
        else:
            assert sigma == 0 and not mask.any()
        # Alg. 1 l.24: f/σ_F on corrupted atoms, 0 elsewhere
        expected = original.forces / FORCE_STD * mask[:, None]
        assert torch.allclose(data[keys.DENS_FORCE_INPUT], expected)
        assert data.energy == original.energy and torch.equal(data.forces, original.forces)
    assert Status.DENS in statuses and Status.ORIGINAL in statuses


def collect(dataset, workers):
    loader = DataLoader(dataset, batch_size=5, num_workers=workers, collate_fn=data_list_collater)
    return [batch.pos for batch in loader]


def test_same_corruption_with_0_or_2_workers_and_per_epoch(ours):
    ours.enable_dens(DeNSConfig(prob=0.5, corrupt_ratio=0.5), seed=3, force_std=FORCE_STD)
    ours.set_dens_epoch(2)
    serial, parallel = collect(ours, 0), collect(ours, 2)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))
    ours.set_dens_epoch(3)
    other_epoch = collect(ours, 0)
    assert not all(torch.equal(a, b) for a, b in zip(serial, other_epoch, strict=True))


def test_oc22_dataset_corrupts_any_atom(emt_data):
    dataset = DeNSOC22LmdbDataset({"src": str(emt_data / "oc22" / "train"), "key_mapping": MAPPING})
    dataset.enable_dens(DeNSConfig(prob=1.0, corrupt_ratio=0.5, candidates="all"), seed=0)
    masks = [dataset[i][keys.DENS_MASK] for i in range(len(dataset))]
    fractions = np.array([m.float().mean().item() for m in masks])
    assert 0.35 < fractions.mean() < 0.65
    dataset.close_db()


def test_window_outside_gives_plain_structures(ours):
    ours.enable_dens(DeNSConfig(prob=1.0, epochs=(1, 2)), seed=0)
    assert not any(k in ours[0] for k in keys.ALL_FIELDS)
    ours.set_dens_epoch(1)
    assert keys.DENS_MASK in ours[0]


def test_missing_fixed_in_oc20_mode_names_file(ours, plain):
    ours.enable_dens(DeNSConfig(prob=1.0), seed=0)
    data = plain[0].clone()
    del data.fixed
    with pytest.raises(DeNSSourceError, match=r"train.*no 'fixed' field.*candidates"):
        ours._dens_corrupt(data, 0)
    del data.forces
    with pytest.raises(DeNSSourceError, match=r"no 'forces' field"):
        ours._dens_corrupt(data, 0)


def free_force_maxima(structures) -> np.ndarray:
    return np.array([float(s.forces[s.fixed == 0].norm(dim=-1).max()) for s in structures])


def test_eligibility_filters_on_generated_data(ours, plain):
    """max_force_norm / min_num_atoms select exactly the structures the data says, and the
    corrupted fraction of every DeNS structure respects max_corrupted_ratio."""
    maxima = free_force_maxima(plain)
    threshold = float(np.median(maxima))
    free_counts = np.array([int((s.fixed == 0).sum()) for s in plain])
    min_atoms = int(np.median(free_counts)) + 1
    assert (maxima > threshold).any() and (maxima <= threshold).any()
    assert (free_counts < min_atoms).any() and (free_counts >= min_atoms).any()

    ours.enable_dens(DeNSConfig(prob=1.0, max_force_norm=threshold), seed=0)
    status = np.array([int(ours[i][keys.DENS_STATUS]) for i in range(len(ours))])
    assert np.array_equal(status == Status.MAX_FORCE, maxima > threshold)
    assert np.all(status[maxima <= threshold] == Status.DENS)

    ours.enable_dens(DeNSConfig(prob=1.0, min_num_atoms=min_atoms), seed=0)
    status = np.array([int(ours[i][keys.DENS_STATUS]) for i in range(len(ours))])
    assert np.array_equal(status == Status.MIN_ATOMS, free_counts < min_atoms)

    ratio = 0.6
    ours.enable_dens(DeNSConfig(prob=1.0, corrupt_ratio=0.5, max_corrupted_ratio=ratio), seed=0)
    items = [ours[i] for i in range(len(ours))]
    for data, free in zip(items, free_counts, strict=True):
        if bool(data[keys.DENS_STRUCTURE]):
            assert int(data[keys.DENS_MASK].sum()) <= ratio * free
    assert any(int(d[keys.DENS_STATUS]) == Status.MAX_RATIO for d in items)


def test_determinism_across_workers_with_all_filters(ours, plain):
    maxima = free_force_maxima(plain)
    config = DeNSConfig(
        prob=0.7,
        corrupt_ratio=0.5,
        max_force_norm=float(np.median(maxima)),
        min_num_atoms=3,
        max_corrupted_ratio=0.8,
        epochs=(0, 5),
    )
    ours.enable_dens(config, seed=11, force_std=FORCE_STD)
    ours.set_dens_epoch(4)
    serial, parallel = collect(ours, 0), collect(ours, 2)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))
