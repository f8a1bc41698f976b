"""End to end through the stock ``fairchem`` CLI in fresh processes: train a tiny
EquiformerV2+DeNS on the generated LMDB, then predict on the test split (no forces, no energies)
from the DeNS checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run_cli, tiny_config, write_config


@pytest.fixture(scope="module")
def trained(emt_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli")
    config = tiny_config(emt_data, prob=0.5)
    config["optim"].update(max_epochs=1, num_workers=2, eval_every=10)
    path = write_config(config, run / "config.yml")
    output = run_cli(
        "--mode",
        "train",
        "--config-yml",
        str(path),
        "--cpu",
        "--run-dir",
        str(run),
        "--identifier",
        "tiny",
        "--print-every",
        "5",
        cwd=run,
    )
    checkpoint = next(run.glob("checkpoints/*/checkpoint.pt"))
    return run, config, output, checkpoint


@pytest.mark.slow
def test_train_logs_dens_terms_and_validates(trained):
    _, _, output, checkpoint = trained
    for term in ("loss_energy", "loss_forces", "loss_dens", "dens_structure_fraction"):
        assert f"{term}:" in output
    assert "energy_mae" in output and "forces_mae" in output  # validation lines
    assert checkpoint.stat().st_size > 0


@pytest.mark.slow
def test_predict_from_dens_checkpoint_on_test_split_without_labels(trained, emt_data):
    run, config, _, checkpoint = trained
    config["dataset"]["test"] = {"src": str(emt_data / "oc20" / "test")}
    path = write_config(config, run / "predict.yml")
    run_cli(
        "--mode",
        "predict",
        "--config-yml",
        str(path),
        "--cpu",
        "--run-dir",
        str(run),
        "--checkpoint",
        str(checkpoint),
        "--identifier",
        "predict",
        cwd=run,
    )
    # fairchem names the file after the task ("ocp" for a trainer given by dotted path)
    predictions = sorted(run.glob("results/*-predict/*_predictions.npz"))
    assert predictions, "no predictions .npz written"
    results = np.load(predictions[-1], allow_pickle=True)
    assert {"energy", "forces", "ids"} <= set(results.files)
    assert np.isfinite(results["energy"].astype(float)).all()
