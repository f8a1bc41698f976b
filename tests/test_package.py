"""Packaging: the fairchem-core version guard, and every YAML-named class resolves by dotted path
in a fresh process (as in spawned DDP ranks and submitit jobs, where our import never ran)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from importlib import metadata

import pytest

import fairchem_dens


def test_other_fairchem_core_version_fails_at_import(monkeypatch):
    real_version = metadata.version
    monkeypatch.setattr(
        metadata,
        "version",
        lambda name: "2.3.0" if name == "fairchem-core" else real_version(name),
    )
    with pytest.raises(ImportError, match=r"requires fairchem-core==1\.10\.0, found 2\.3\.0"):
        importlib.reload(fairchem_dens)
    monkeypatch.undo()
    importlib.reload(fairchem_dens)


DOTTED = [
    ("trainer", "fairchem_dens.trainer.DeNSTrainer"),
    ("dataset", "fairchem_dens.datasets.DeNSLmdbDataset"),
    ("dataset", "fairchem_dens.datasets.DeNSOC22LmdbDataset"),
    ("dataset", "fairchem_dens.datasets.DeNSAseDBDataset"),
    ("model", "fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone"),
    ("model", "fairchem_dens.models.escn.DeNSeSCNBackbone"),
    ("model", "fairchem_dens.heads.EqV2NoiseHead"),
    ("model", "fairchem_dens.heads.eSCNNoiseHead"),
]


def test_dotted_paths_resolve_in_a_fresh_process():
    lookups = "; ".join(
        f"assert registry.get_{kind}_class('{path}').__name__ == '{path.rsplit('.', 1)[1]}'"
        for kind, path in DOTTED
    )
    code = f"from fairchem.core.common.registry import registry; {lookups}; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_short_names_do_not_clash_with_fairchem():
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import setup_imports

    setup_imports()
    import fairchem_dens.trainer  # noqa: F401  (registers our short names)

    assert registry.get_trainer_class("equiformerv2_dens").__module__.startswith("fairchem.core")
    assert registry.get_trainer_class("dens_forces").__module__ == "fairchem_dens.trainer"
    assert registry.get_model_class("equiformer_v2_dens_backbone").__module__.startswith(
        "fairchem.core"
    )
