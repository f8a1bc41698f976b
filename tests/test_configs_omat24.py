"""The MPtrj / OMat24-style run files (``configs/omat24``): fairchem's recipe with DeNS really on,
fairchem 1.10's stress head, the baseline as the DeNS run minus DeNS, the full-size model is
fairchem's 31M "eqV2 S", and the file trains two steps through the stock CLI on ``.aselmdb``."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import TWO_STEP_ARGS, hydra, train_run_file

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DENS_FILE = "omat24/equiformer_v2_dens.yml"
BASELINE_FILE = "omat24/equiformer_v2.yml"
#: fairchem's configs/omat24/mptrj/eqV2_31M_dens_mptrj.yml: denoising_pos_params prob 0.5,
#: fixed_noise_std True, std 0.1; denoising_pos_coefficient 10; energy head use_denoising True
FAIRCHEM_DENS = {
    "sigma": 0.1,
    "prob": 0.5,
    "coefficient": 10,
    "corrupt_ratio": 1.0,
    "candidates": "free",
    "energy_on_dens": True,
    "energy_targets": ["energy"],
    "schedule": "constant",
}
#: fairchem's model name for this size ("eqV2 S", the 31M model of its OMat24 release)
FAIRCHEM_PARAMETERS = 31e6


@functools.cache
def _load(name: str) -> tuple[str, list, list]:
    from fairchem.core.common.utils import load_config

    config, warnings, errors = load_config(str(CONFIGS / name))
    return json.dumps(config), warnings, errors


def load(name: str) -> dict[str, Any]:
    return json.loads(_load(name)[0])


@pytest.mark.parametrize("name", [DENS_FILE, BASELINE_FILE])
def test_run_file_loads_without_conflicts(name: str) -> None:
    _, warnings, errors = _load(name)
    assert warnings == [] and errors == [], (warnings, errors)
    config = load(name)
    assert config["trainer"] == "fairchem_dens.trainer.DeNSTrainer"
    train = config["dataset"]["train"]
    assert train["format"] == "fairchem_dens.datasets.DeNSAseDBDataset"
    assert train["a2g_args"] == {"r_energy": True, "r_forces": True, "r_stress": True}
    assert set(config["outputs"]["stress"]["decomposition"]) == {
        "stress_isotropic",
        "stress_anisotropic",
    }


def test_every_yaml_is_a_run_file_or_included_by_one() -> None:
    reached, todo = set(), [CONFIGS / DENS_FILE, CONFIGS / BASELINE_FILE]
    while todo:
        path = todo.pop()
        reached.add(path)
        todo += [path.parent / p for p in yaml.safe_load(path.read_text()).get("includes", [])]
    assert set((CONFIGS / "omat24").rglob("*.yml")) == reached


def test_dens_section_is_fairchems_recipe_and_on() -> None:
    from fairchem_dens.config import DeNSConfig

    optim = load(DENS_FILE)["optim"]
    assert optim["dens"] == FAIRCHEM_DENS
    config = DeNSConfig.from_optim(optim)
    assert config is not None and not config.multi_scale  # a fixed σ


def test_baseline_is_the_dens_run_without_dens() -> None:
    from fairchem_dens.config import DeNSConfig

    base, dens = load(BASELINE_FILE), load(DENS_FILE)
    assert DeNSConfig.from_optim(base["optim"]) is None
    for section in ("dataset", "loss_functions", "outputs", "evaluation_metrics"):
        assert base[section] == dens[section], section
    base["optim"].pop("dens"), dens["optim"].pop("dens")
    assert base["optim"] == dens["optim"]
    heads = {k: v for k, v in dens["model"]["heads"].items() if k != "dens_noise"}
    assert base["model"]["heads"] == heads
    skip = ("model", "use_force_encoding", "use_sigma_encoding")
    assert {k: v for k, v in base["model"]["backbone"].items() if k != "model"} == {
        k: v for k, v in dens["model"]["backbone"].items() if k not in skip
    }


def test_full_size_models_are_fairchems_31m_eqv2_plus_the_dens_modules() -> None:
    from fairchem_dens.force_encoding import ForceEncoding
    from fairchem_dens.heads import EqV2NoiseHead

    counts = {}
    for name in (BASELINE_FILE, DENS_FILE):
        model = load(name)["model"]
        net = hydra(model["backbone"], model["heads"])
        total = sum(p.numel() for p in net.parameters())
        dens_only = sum(
            p.numel()
            for m in net.modules()
            if isinstance(m, (ForceEncoding, EqV2NoiseHead))
            for p in m.parameters()
        )
        counts[name] = (total, dens_only)
        del net
    base, dens = counts[BASELINE_FILE], counts[DENS_FILE]
    assert abs(base[0] - FAIRCHEM_PARAMETERS) <= 0.05 * FAIRCHEM_PARAMETERS, base
    assert base[1] == 0 and dens[1] > 0 and dens[0] == base[0] + dens[1]


SHRINK = {
    "num_layers": 1,
    "sphere_channels": 8,
    "attn_hidden_channels": 8,
    "num_heads": 2,
    "attn_alpha_channels": 4,
    "attn_value_channels": 4,
    "ffn_hidden_channels": 8,
    "lmax_list": [2],
    "mmax_list": [1],
    "grid_resolution": 8,
    "num_sphere_samples": 16,
    "edge_channels": 8,
    "max_radius": 5.0,
    "max_neighbors": 12,
}


@pytest.mark.slow
def test_dens_run_file_trains_two_steps_through_the_stock_cli(bulk_data, tmp_path) -> None:
    """The file as written (fairchem fits the normalizers and element references at start-up),
    pointed at the generated .aselmdb and shrunk by command-line overrides only."""
    args = [f"--model.backbone.{key}={value}" for key, value in SHRINK.items()]
    args += [
        f"--dataset.train.src={bulk_data / 'train'}",
        f"--dataset.val.src={bulk_data / 'val'}",
        *TWO_STEP_ARGS,
        "--optim.eval_every=2",  # validate and save after the second step
    ]
    output = train_run_file(CONFIGS / DENS_FILE, tmp_path, *args)
    assert "dens_coefficient: 1.00e+01" in output and "loss_stress_anisotropic" in output
    fitted = set(re.findall(r"Normalization values for output (\w+):", output))
    assert {"forces", "stress_isotropic", "stress_anisotropic"} <= fitted
