"""The MD17-style molecule configs (``configs/molecules``): paper values, fairchem's loader, and
one epoch of a tiny model through the stock CLI with ``use_pbc: false``, then predict."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import run_cli

pytest.importorskip("tblite")
pytest.importorskip("rdkit")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "molecules"
DENS_FILE = "equiformer_v2_dens.yml"
BASELINE_FILE = "equiformer_v2.yml"
RUN_FILES = (DENS_FILE, BASELINE_FILE)

#: Table 9 (ethanol, aspirin) and App. D.2 of the DeNS paper.
PAPER_DENS = {
    "sigma": 0.05,
    "prob": 0.25,
    "corrupt_ratio": 0.25,
    "coefficient": 5,
    "schedule": "linear",
    "coefficient_floor": 0.0,
    "candidates": "all",
}
PAPER_LOSS = {"energy": ("mae", 1), "forces": ("l2mae", 80)}

#: Command-line overrides that shrink the model (backbone arguments of the run files).
SHRINK = {
    "num_layers": 1,
    "sphere_channels": 8,
    "attn_hidden_channels": 8,
    "num_heads": 2,
    "attn_alpha_channels": 4,
    "attn_value_channels": 4,
    "ffn_hidden_channels": 8,
    "edge_channels": 8,
    "num_sphere_samples": 16,
}


def load(name: str) -> tuple[dict[str, Any], list, list]:
    from fairchem.core.common.utils import load_config

    return load_config(str(CONFIGS / name))


@pytest.mark.parametrize("name", RUN_FILES)
def test_run_file_loads_without_conflicts_and_has_the_papers_values(name: str) -> None:
    config, warnings, errors = load(name)
    assert warnings == [] and errors == [], (warnings, errors)
    assert config["trainer"] == "fairchem_dens.trainer.DeNSTrainer"
    train = config["dataset"]["train"]
    assert train["format"] == "fairchem_dens.datasets.DeNSLmdbDataset"
    assert train["key_mapping"] == {"y": "energy", "force": "forces"}
    losses = {
        k: (v["fn"], v["coefficient"]) for item in config["loss_functions"] for k, v in item.items()
    }
    assert losses == PAPER_LOSS
    backbone = config["model"]["backbone"]
    assert backbone["use_pbc"] is False and backbone["lmax_list"] == [2]
    dens = config["optim"]["dens"]
    for key, value in PAPER_DENS.items():
        assert dens[key] == value, key
    if name == BASELINE_FILE:
        assert dens["enabled"] is False
        assert backbone["model"] == "equiformer_v2_backbone"
        assert set(config["model"]["heads"]) == {"energy", "forces"}
    else:
        assert dens.get("enabled", True) is True
        assert backbone["use_force_encoding"] is True
        assert "dens_noise" in config["model"]["heads"]


def test_dens_section_is_valid() -> None:
    from fairchem_dens.config import DeNSConfig

    config, _, _ = load(DENS_FILE)
    dens = DeNSConfig.from_optim(config["optim"])
    assert dens is not None and not dens.multi_scale
    # App. D.2: λ_DeNS decays linearly from 5 to 0 over the run
    assert dens.coefficient_at(0, 100) == 5.0
    assert dens.coefficient_at(50, 100) == pytest.approx(2.5)
    assert dens.coefficient_at(100, 100) == 0.0


def test_backbone_keys_are_arguments_of_fairchems_backbone() -> None:
    from fairchem.core.common.registry import registry
    from fairchem.core.common.utils import setup_imports

    setup_imports()
    config, _, _ = load(BASELINE_FILE)
    cls = registry.get_model_class(config["model"]["backbone"]["model"])
    accepted = set(inspect.signature(cls.__init__).parameters)
    unknown = set(config["model"]["backbone"]) - accepted - {"model"}
    assert not unknown, unknown


@pytest.fixture(scope="module")
def molecules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fairchem_dens.data import generate_molecules

    out = tmp_path_factory.mktemp("molecules")
    generate_molecules(out, ["ethanol"], train=8, val=4, test=4, spacing=2, equilibration=10)
    return out / "ethanol"


def _train_args(name: str, data: Path, run: Path) -> list[str]:
    args = ["--mode", "train", "--config-yml", str(CONFIGS / name), "--cpu"]
    args += ["--run-dir", str(run), "--identifier", "tiny", "--print-every", "1"]
    args += [f"--model.backbone.{key}={value}" for key, value in SHRINK.items()]
    return [
        *args,
        f"--dataset.train.src={data / 'train'}",
        f"--dataset.val.src={data / 'val'}",
        "--optim.batch_size=4",
        "--optim.eval_batch_size=4",
        "--optim.num_workers=0",
        "--optim.max_epochs=1",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", RUN_FILES)
def test_one_epoch_nonperiodic_through_the_stock_cli_then_predict(
    name: str, molecules: Path, tmp_path: Path
) -> None:
    """The run file as written (from another cwd, use_pbc: false), shrunk by overrides only."""
    pytest.importorskip("torch_cluster")  # torch_geometric's radius_graph (use_pbc: false)
    output = run_cli(*_train_args(name, molecules, tmp_path), cwd=tmp_path)
    assert "step: 2.00e+00" in output and "step: 3.00e+00" not in output  # 8 frames / batch 4
    assert "forces_mae" in output  # validated
    if name == DENS_FILE:
        assert "loss_dens" in output and "dens_coefficient" in output
    else:
        assert "loss_dens" not in output
    # the normaliser fitted on the whole train split equals the generator's stats.json
    stats = json.loads((molecules / "stats.json").read_text())
    logged = dict(
        (target, (float(mean), float(rmsd)))
        for target, mean, rmsd in re.findall(
            r"Normalization values for output (\w+): mean=(\S+), rmsd=(\S+?)\.$", output, re.M
        )
    )
    assert logged["energy"] == pytest.approx((stats["energy_mean"], stats["energy_std"]), rel=1e-6)
    assert logged["forces"] == pytest.approx((0.0, stats["force_std"]), rel=1e-5)

    checkpoint = next(tmp_path.glob("checkpoints/*/checkpoint.pt"))
    run_cli(
        "--mode",
        "predict",
        "--config-yml",
        str(CONFIGS / name),
        "--cpu",
        "--run-dir",
        str(tmp_path),
        "--identifier",
        "predict",
        "--checkpoint",
        str(checkpoint),
        *[f"--model.backbone.{key}={value}" for key, value in SHRINK.items()],
        f"--dataset.train.src={molecules / 'train'}",
        f"--dataset.val.src={molecules / 'val'}",
        f"--dataset.test.src={molecules / 'test'}",
        "--optim.eval_batch_size=4",
        "--optim.num_workers=0",
        cwd=tmp_path,
    )
    predictions = sorted(tmp_path.glob("results/*-predict/*_predictions.npz"))
    assert predictions, "no predictions .npz written"
    results = np.load(predictions[-1], allow_pickle=True)
    assert len(results["ids"]) == 4
    energies = results["energy"].astype(float)
    assert np.isfinite(energies).all()
    # de-normalised: total GFN2-xTB energies of ethanol (a few hundred eV below zero)
    assert np.all(np.abs(energies - stats["energy_mean"]) < 10 * stats["energy_std"] + 1.0)
