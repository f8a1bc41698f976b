"""Session fixtures: one small generated EMT dataset (OC20 and OC22 style) shared by the tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.fixture(scope="session")
def emt_data(tmp_path_factory) -> Path:
    """``<dir>/oc20`` and ``<dir>/oc22`` as written by ``python -m fairchem_dens.data``."""
    from fairchem_dens.data import generate

    out = tmp_path_factory.mktemp("emt")
    generate(out, variant="both", systems=16, seed=0, max_steps=40)
    return out


@pytest.fixture(scope="session")
def bulk_data(tmp_path_factory) -> Path:
    """``<dir>/bulk``: EMT bulk cells with energy, forces, stress as ``.aselmdb`` (48 cells)."""
    from fairchem_dens.data.bulk import generate_bulk

    out = tmp_path_factory.mktemp("bulk")
    generate_bulk(out, structures=48, seed=0)
    return out / "bulk"
