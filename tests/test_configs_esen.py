"""The energy-conserving eSEN run configs (``configs/**/*esen*.yml``).

* every file loads through fairchem's own loader (only the demo's documented normaliser override
  is logged as overwritten), and every eSEN YAML is a run file or included by one;
* every value is the one its comment cites (one row per value), the DeNS keys under
  ``optim.dens`` are those of the files they follow (Table 9 for molecules, the EquiformerV2 OC20
  DeNS file for OC20) and validate as the trainer reads them;
* gradient forces: the forces are normalised by the energy's σ in every file;
* the OC20 model is fairchem's eSEN-30M-OAM: exactly its 30,161,153 parameters;
* every file's model builds at tiny size with the file's heads and gives energy, forces (and the
  noise on a DeNS batch);
* every run file trains two steps through the stock CLI, shrunk on the command line only;
* the demo files run end to end through the stock CLI: train, predict from the checkpoint, relax;
  and the conserving eSEN with stress trains with DeNS on the generated bulk cells.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
from pathlib import Path
from typing import Any

import ase.io
import numpy as np
import pytest
import torch
import yaml
from helpers import (
    TINY_ESEN,
    TWO_STEP_ARGS,
    hydra,
    logged_normalizers,
    random_batch,
    run_cli,
    train_run_file,
    with_dens_fields,
    write_config,
)

from fairchem_dens import keys

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

#: OC20 run files (their fragments are reached through ``includes``)
OC20_RUN_FILES = ("oc20/s2ef_2m/esen_dens.yml", "oc20/s2ef_2m/esen.yml")
MOLECULE_RUN_FILES = ("molecules/esen_dens.yml", "molecules/esen.yml")
DEMO_RUN_FILES = ("demo/esen_dens.yml", "demo/esen_dens_relax.yml")
RUN_FILES = (*OC20_RUN_FILES, *MOLECULE_RUN_FILES, *DEMO_RUN_FILES)
DENS_FILES = tuple(name for name in RUN_FILES if "esen_dens" in name)
#: baseline -> the DeNS run it equals with DeNS switched off
BASELINE_PARTNER = {
    "oc20/s2ef_2m/esen.yml": "oc20/s2ef_2m/esen_dens.yml",
    "molecules/esen.yml": "molecules/esen_dens.yml",
}
#: the demo files include data/demo/oc20/normalizers.yml (relative to the repo root) and override
#: its two rmsd values on purpose: the only keys fairchem may report as overwritten
DEMO_OVERRIDES = [
    "dataset.train.transforms.normalizer.energy.rmsd",
    "dataset.train.transforms.normalizer.forces.rmsd",
]

DENS_BACKBONE = "fairchem_dens.models.esen.DeNSeSENBackbone"
EFS_HEADS = {"efs": {"module": "esen_mlp_efs_head"}}
NOISE_HEAD = {"dens_noise": {"module": "fairchem_dens.heads.eSENNoiseHead"}}

# ---- sources -------------------------------------------------------------------------------

#: fairchem's eSEN-30M-OAM: Matbench Discovery's model file gives its parameter count, cutoff
#: (eSEN paper Table 5) and neighbour limit (eSEN paper §5.3)
MBD_30M = "janosh/matbench-discovery models/eSEN/eSEN-30m-oam.yml"
ESEN_30M_PARAMETERS = 30_161_153  # MBD_30M: model_params
COUNT = f"eSEN-30M-OAM: pinned by its {ESEN_30M_PARAMETERS:,} parameters ({MBD_30M})"
T7 = "DeNS paper Table 7 (S2EF-2M)"
ASSUMED_EQV2 = "assumed for eSEN: equiformer_v2_dens.yml's value"
#: energy std of the ethanol train split the molecule generator writes with its defaults
ETHANOL_ENERGY_STD = 0.14044189974932392
#: energy std of the default demo train split (python -m fairchem_dens.data --seed 0)
DEMO_ENERGY_STD = 2.5490062021322593

Row = tuple[str, Any, str]  # (key path, value, citation)

B = "model.backbone."
OC20_ROWS: list[Row] = [
    (B + "num_layers", 10, COUNT),
    (B + "sphere_channels", 128, COUNT),
    (B + "hidden_channels", 128, COUNT),
    (B + "edge_channels", 128, COUNT),
    (B + "lmax", 3, COUNT),
    (B + "mmax", 2, COUNT),
    (B + "num_distance_basis", 64, COUNT),
    (B + "max_num_elements", 100, COUNT),
    (B + "mlp_type", "spectral", COUNT),
    (B + "act_type", "gate", COUNT + "; eSEN paper: gated non-linearity"),
    (B + "cutoff", 6.0, f"eSEN paper Table 5: 6 Å ({MBD_30M})"),
    (B + "max_neighbors", 300, f"eSEN paper §5.3: no limit ({MBD_30M}); eSEN_Backbone default"),
    (B + "distance_function", "gaussian", "eSEN_Backbone default (assumed)"),
    (B + "norm_type", "rms_norm_sh", "eSEN_Backbone default (assumed)"),
    (B + "use_envelope", True, "eSEN paper: smooth energy at the cutoff (assumed)"),
    (B + "direct_forces", False, "energy-conserving: forces = -dE/dr"),
    (B + "regress_stress", False, "OC20 S2EF has no stress labels"),
    (B + "use_pbc", True, "OC20 slabs are periodic"),
    ("loss_functions.energy.coefficient", 2, T7 + ": λ_E 2"),
    ("loss_functions.forces.coefficient", 100, T7 + ": λ_F 100"),
    ("optim.optimizer", "AdamW", T7 + "; " + ASSUMED_EQV2),
    ("optim.optimizer_params.weight_decay", 1e-3, T7 + ": 1e-3; " + ASSUMED_EQV2),
    ("optim.scheduler_params.lambda_type", "cosine", T7 + "; " + ASSUMED_EQV2),
    ("optim.scheduler_params.warmup_epochs", 0.1, T7 + "; " + ASSUMED_EQV2),
    ("optim.clip_grad_norm", 100, T7),
    ("optim.ema_decay", 0.999, T7),
    ("optim.max_epochs", 12, "Table 1d (12 epochs); " + ASSUMED_EQV2),
    ("optim.lr_initial", 2e-4, T7 + ": 2e-4 for 12 epochs; " + ASSUMED_EQV2),
    ("optim.batch_size", 4, T7 + ": batch 64 = 4 per rank x 16 GPUs (App. B.1)"),
]
#: the public OC20 S2EF-2M normaliser (oc20_s2ef_2m_base.yml): σ_F = σ_E already
OC20_NORMALIZER = {
    "energy": {"mean": -0.7554450631141663, "rmsd": 2.887317180633545},
    "forces": {"mean": 0.0, "rmsd": 2.887317180633545},
}
#: the DeNS paper's OC20 DeNS (oc20_s2ef_2m_dens.yml) with the 12-epoch σ_high of Table 1b: the
#: optim.dens section of configs/oc20/s2ef_2m/equiformer_v2_dens.yml, assumed for eSEN
OC20_DENS = {
    "sigma": None,  # multi-scale noise (Eq. 7; Table 1e idx 1 vs 4)
    "sigma_low": 0.01,  # §3.2.3: σ_1 = 0.01
    "sigma_high": 0.5,  # Table 1 caption / 1b: 0.5 for 12 epochs
    "num_sigmas": 50,  # §3.2.3: T = 50
    "prob": 0.5,  # Table 1b best setting
    "coefficient": 10,  # Table 1c / 1d
    "corrupt_ratio": 1.0,  # Table 7, App. B.1
    "candidates": "free",  # App. B.1
    "energy_on_dens": True,  # Eq. 6
    "schedule": "constant",
}

MOLECULE_ROWS: list[Row] = [
    (B + "lmax", 2, "Table 4: Equiformer (Lmax = 2)"),
    (B + "mmax", 2, "all orders m, as Equiformer's tensor products"),
    (B + "cutoff", 5.0, "Equiformer MD17: cutoff 5 Å"),
    (B + "max_neighbors", 1000, "Equiformer MD17: every neighbour within the cutoff"),
    (B + "num_distance_basis", 32, "Equiformer MD17: 32 radial bases"),
    (B + "use_pbc", False, "non-periodic molecules, as the other molecule configs"),
    (B + "direct_forces", False, "energy-conserving: forces = -dE/dr"),
    (B + "regress_stress", False, "a molecule has no cell"),
    ("loss_functions.energy.coefficient", 1, "Table 9: λ_E 1 (ethanol, aspirin)"),
    ("loss_functions.forces.coefficient", 80, "Table 9: λ_F 80 (ethanol, aspirin)"),
]
#: Table 9 (ethanol, aspirin) and App. D.2: as configs/molecules/equiformer_v2_dens.yml
MOLECULE_DENS = {
    "sigma": 0.05,
    "prob": 0.25,
    "corrupt_ratio": 0.25,
    "coefficient": 5,
    "schedule": "linear",
    "coefficient_floor": 0.0,
    "candidates": "all",
    "energy_on_dens": True,
}

PAPER: dict[str, list[Row]] = {
    **{name: OC20_ROWS for name in OC20_RUN_FILES},
    **{name: MOLECULE_ROWS for name in MOLECULE_RUN_FILES},
}

# ---- loading -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory, emt_data: Path) -> Path:
    """A folder laid out as the repo root after ``make demo`` (data/demo/oc20 is the generated
    EMT data): the demo files include data/demo/oc20/normalizers.yml from there."""
    root = tmp_path_factory.mktemp("demo_root")
    (root / "data" / "demo").mkdir(parents=True)
    (root / "data" / "demo" / "oc20").symlink_to(emt_data / "oc20")
    return root


@functools.cache
def _load(name: str, cwd: str) -> tuple[str, list, list]:
    import os

    from fairchem.core.common.utils import load_config

    previous = os.getcwd()
    os.chdir(cwd)  # the demo's data include is relative to the repo root
    try:
        config, warnings, errors = load_config(str(CONFIGS / name))
    finally:
        os.chdir(previous)
    return json.dumps(config), warnings, errors


def load(name: str, cwd: Path = REPO) -> dict[str, Any]:
    return json.loads(_load(name, str(cwd))[0])


def load_any(name: str, demo_root: Path) -> dict[str, Any]:
    return load(name, demo_root if name.startswith("demo/") else REPO)


def lookup(config: dict[str, Any], path: str) -> Any:
    """Value at a dotted path; ``loss_functions.<target>`` searches fairchem's list of losses."""
    node: Any = config
    for part in path.split("."):
        if isinstance(node, list):
            node = next(item[part] for item in node if part in item)
        else:
            node = node[part]
    return node


@pytest.mark.parametrize("name", RUN_FILES)
def test_run_file_loads_with_fairchems_loader(name: str, demo_root: Path) -> None:
    cwd = demo_root if name.startswith("demo/") else REPO
    _, warnings, errors = _load(name, str(cwd))
    assert errors == [], errors
    assert warnings == (DEMO_OVERRIDES if name.startswith("demo/") else []), warnings
    config = load(name, cwd)
    assert config["trainer"] == "fairchem_dens.trainer.DeNSTrainer"
    assert config["dataset"]["train"]["format"] == "fairchem_dens.datasets.DeNSLmdbDataset"
    model = config["model"]
    assert model["name"] == "hydra" and model["otf_graph"] is True
    assert model["pass_through_head_outputs"] is True
    assert model["heads"]["efs"] == {"module": "esen_mlp_efs_head"}  # energy-conserving
    assert model["backbone"]["direct_forces"] is False


def test_every_esen_yaml_is_a_run_file_or_included_by_one() -> None:
    """No untested file: each eSEN YAML under configs/ is in RUN_FILES or reached through the
    includes of one (the demo's data include is generated, not a config of this repo)."""
    reached, todo = set(), [CONFIGS / name for name in RUN_FILES]
    while todo:
        path = todo.pop()
        reached.add(path)
        for include in yaml.safe_load(path.read_text()).get("includes", []):
            if not include.startswith("data/"):
                todo.append(path.parent / include)
    esen = {p for p in CONFIGS.rglob("*.yml") if "esen" in p.name}
    assert esen <= reached, sorted(str(p) for p in esen - reached)
    oc20 = {p for p in reached if p.is_relative_to(CONFIGS / "oc20")}
    assert {p for p in oc20 if "esen" in p.name} == {
        p for p in (CONFIGS / "oc20").rglob("*.yml") if "esen" in p.name
    }


# ---- values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key", "value", "cite"),
    [
        pytest.param(name, key, value, cite, id=f"{name}:{key}")
        for name, rows in PAPER.items()
        for key, value, cite in rows
    ],
)
def test_value(name: str, key: str, value: Any, cite: str) -> None:
    assert lookup(load(name), key) == value, f"{key}: {value!r} ({cite})"


def _normalizer(config: dict[str, Any]) -> dict[str, Any]:
    normalizer = config["dataset"]["train"]["transforms"]["normalizer"]
    return normalizer["fit"]["targets"] if "fit" in normalizer else normalizer


@pytest.mark.parametrize("name", RUN_FILES)
def test_forces_are_normalised_by_the_energys_sigma(name: str, demo_root: Path) -> None:
    """Gradient forces of the normalised energy are F/σ_E: the forces target must be divided by
    the same σ, with mean 0 (one literal where fairchem fits or reads the rest)."""
    config = load_any(name, demo_root)
    normalizer = _normalizer(config)
    assert normalizer["forces"]["mean"] == 0.0
    assert normalizer["forces"]["rmsd"] == normalizer["energy"]["rmsd"]
    expected = {"oc20": OC20_NORMALIZER["energy"]["rmsd"], "molecules": ETHANOL_ENERGY_STD}
    assert normalizer["energy"]["rmsd"] == expected.get(name.split("/")[0], DEMO_ENERGY_STD)
    if name.startswith("oc20"):
        assert config["dataset"]["train"]["transforms"]["normalizer"] == OC20_NORMALIZER
    if name.startswith("molecules"):  # the energy mean is still fitted on the train split
        assert "mean" not in normalizer["energy"]


@pytest.mark.parametrize("name", DENS_FILES)
def test_dens_keys_under_optim_dens(name: str, demo_root: Path) -> None:
    from fairchem_dens.config import DeNSConfig

    optim = load_any(name, demo_root)["optim"]
    dens = DeNSConfig.from_optim(optim)  # validates every key as the trainer does
    assert dens is not None
    if name.startswith("oc20"):
        assert optim["dens"] == OC20_DENS
        assert optim["dens"] == load("oc20/s2ef_2m/equiformer_v2_dens.yml")["optim"]["dens"]
        assert dens.multi_scale
    elif name.startswith("molecules"):
        assert optim["dens"] == MOLECULE_DENS
        eqv2 = load("molecules/equiformer_v2_dens.yml")["optim"]["dens"]
        assert optim["dens"] == eqv2  # the same Table 9 section
        assert not dens.multi_scale
        assert dens.coefficient_at(0, 100) == 5.0 and dens.coefficient_at(100, 100) == 0.0
    else:  # the demo: configs/demo/base.yml's section, as every demo
        base = yaml.safe_load((CONFIGS / "demo/base.yml").read_text())
        assert optim["dens"] == base["optim"]["dens"]


@pytest.mark.parametrize("name", list(BASELINE_PARTNER))
def test_baseline_is_the_dens_run_without_dens(name: str) -> None:
    """fairchem's own eSEN and head, DeNS off; data, optimiser and architecture as the DeNS run."""
    from fairchem_dens.config import DeNSConfig

    config, partner = load(name), load(BASELINE_PARTNER[name])
    assert DeNSConfig.from_optim(config["optim"]) is None
    assert config["model"]["backbone"]["model"] == "esen_backbone"
    assert partner["model"]["backbone"]["model"] == DENS_BACKBONE
    assert partner["model"]["backbone"]["use_force_encoding"] is True
    assert config["model"]["heads"] == EFS_HEADS
    assert partner["model"]["heads"] == {**EFS_HEADS, **NOISE_HEAD}
    for section in ("dataset", "loss_functions", "outputs", "evaluation_metrics"):
        assert config[section] == partner[section], section
    optim, partner_optim = dict(config["optim"]), dict(partner["optim"])
    optim.pop("dens"), partner_optim.pop("dens")
    assert optim == partner_optim
    backbone = {k: v for k, v in config["model"]["backbone"].items() if k != "model"}
    skip = ("model", "use_force_encoding", "use_sigma_encoding")
    assert backbone == {k: v for k, v in partner["model"]["backbone"].items() if k not in skip}


@pytest.mark.parametrize("name", MOLECULE_RUN_FILES)
def test_molecule_runs_differ_from_the_equiformer_v2_ones_only_in_the_model(name: str) -> None:
    """The same md17_base.yml (data, losses, optimiser, Table 9 DeNS); only the normaliser's σ
    differs, as gradient forces need."""
    config = load(name)
    other = load(name.replace("esen", "equiformer_v2"))
    for section in ("trainer", "outputs", "loss_functions", "evaluation_metrics", "optim"):
        assert config[section] == other[section], section
    dataset, other_dataset = copy.deepcopy(config["dataset"]), copy.deepcopy(other["dataset"])
    targets = dataset["train"]["transforms"]["normalizer"]["fit"]["targets"]
    for target in ("energy", "forces"):
        assert targets[target].pop("rmsd") == ETHANOL_ENERGY_STD
    assert dataset == other_dataset


@pytest.mark.parametrize("name", RUN_FILES)
def test_backbone_keys_are_arguments_of_fairchems_esen(name: str, demo_root: Path) -> None:
    from fairchem.core.models.esen.esen import eSEN_Backbone

    from fairchem_dens.models.esen import DeNSeSENBackbone

    backbone = load_any(name, demo_root)["model"]["backbone"]
    parameters = set(inspect.signature(eSEN_Backbone.__init__).parameters)
    if backbone["model"] == DENS_BACKBONE:
        for klass in DeNSeSENBackbone.__mro__:
            if "__init__" in vars(klass):
                parameters |= set(inspect.signature(klass.__init__).parameters)
    else:
        assert backbone["model"] == "esen_backbone"
    unknown = set(backbone) - parameters - {"model"}
    assert not unknown, f"not arguments of {backbone['model']}: {sorted(unknown)}"


# ---- models --------------------------------------------------------------------------------


def parameter_count(model: dict[str, Any]) -> tuple[int, int]:
    """(parameters, DeNS-only parameters) of a config's model at full size."""
    from fairchem_dens.dens_only import dens_only_parameters

    net = hydra(model["backbone"], model["heads"])
    return sum(p.numel() for p in net.parameters()), sum(
        p.numel() for p in dens_only_parameters(net)
    )


def test_oc20_model_is_esen_30m_oam() -> None:
    """fairchem's eSEN-30M-OAM: exactly its parameter count; DeNS adds only its own modules."""
    plain, plain_dens = parameter_count(load("oc20/s2ef_2m/esen.yml")["model"])
    assert (plain, plain_dens) == (ESEN_30M_PARAMETERS, 0), MBD_30M
    dens, dens_only = parameter_count(load("oc20/s2ef_2m/esen_dens.yml")["model"])
    assert dens_only > 0 and dens == plain + dens_only


def test_molecule_model_size_is_the_commented_one() -> None:
    """md17_esen_backbone.yml: 2.86M parameters, 2.93M with DeNS."""
    plain, _ = parameter_count(load("molecules/esen.yml")["model"])
    dens, _ = parameter_count(load("molecules/esen_dens.yml")["model"])
    assert round(plain / 1e6, 2) == 2.86 and round(dens / 1e6, 2) == 2.93


@pytest.mark.parametrize("name", RUN_FILES)
def test_model_builds_at_tiny_size_with_the_files_heads(name: str, demo_root: Path) -> None:
    """The file's backbone class, switches and heads with the tiny eSEN sizes: energy and
    conserving forces on a clean batch; the noise too on a DeNS batch."""
    model = load_any(name, demo_root)["model"]
    torch.manual_seed(0)
    net = hydra({**model["backbone"], **TINY_ESEN}, model["heads"])
    assert net.backbone.direct_forces is False
    batch = random_batch()
    out = net(batch.clone())
    assert out["energy"].shape == (2,) and out["forces"].shape == (12, 3)
    assert all(torch.isfinite(out[k]).all() for k in ("energy", "forces"))
    if "dens_noise" in model["heads"]:
        out = net(with_dens_fields(batch))
        assert out[keys.NOISE_OUTPUT].shape == (12, 3)
        assert torch.isfinite(out[keys.NOISE_OUTPUT]).all()


# ---- two steps through the stock CLI --------------------------------------------------------

#: the tiny eSEN sizes (helpers.TINY_ESEN) as command-line overrides
SHRINK = [
    f"--model.backbone.{key}={TINY_ESEN[key]}"
    for key in (
        "num_layers",
        "sphere_channels",
        "hidden_channels",
        "edge_channels",
        "num_distance_basis",
        "lmax",
        "mmax",
        "max_neighbors",
        "cutoff",
    )
]


@pytest.fixture(scope="module")
def molecules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ethanol set (8 train, 4 val, 4 test frames), as tests/test_configs_molecules.py."""
    pytest.importorskip("tblite")
    pytest.importorskip("rdkit")
    from fairchem_dens.data import generate_molecules

    out = tmp_path_factory.mktemp("esen_molecules")
    generate_molecules(out, ["ethanol"], train=8, val=4, test=4, spacing=2, equilibration=10)
    return out / "ethanol"


def _data_args(name: str, emt_data: Path, molecules: Path | None) -> list[str]:
    if name.startswith("molecules"):
        assert molecules is not None
        train, val = molecules / "train", molecules / "val"
    else:
        train, val = emt_data / "oc20" / "train", emt_data / "oc20" / "val"
    return [
        f"--dataset.train.src={train}",
        f"--dataset.val.src={val}",
        *TWO_STEP_ARGS,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", [*OC20_RUN_FILES, *MOLECULE_RUN_FILES])
def test_run_file_trains_two_steps_through_the_stock_cli(
    name: str, emt_data: Path, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The file exactly as written (from another cwd), shrunk by command-line overrides only."""
    molecules = request.getfixturevalue("molecules") if name.startswith("molecules") else None
    if molecules is not None:
        pytest.importorskip("torch_cluster")  # use_pbc: false (torch_geometric's radius_graph)
    output = train_run_file(
        CONFIGS / name, tmp_path, *SHRINK, *_data_args(name, emt_data, molecules)
    )
    config = load(name)
    if name in DENS_FILES:
        assert "loss_dens" in output and "dens_coefficient" in output
        if config["optim"]["dens"]["schedule"] == "constant":  # the file's λ_DeNS
            assert f"dens_coefficient: {config['optim']['dens']['coefficient']:.2e}" in output
    else:
        assert "loss_dens" not in output
    logged = logged_normalizers(output)
    assert logged["forces"][0] == 0.0 and logged["forces"][1] == logged["energy"][1]
    if name.startswith("oc20"):
        assert logged["energy"][1] == pytest.approx(OC20_NORMALIZER["energy"]["rmsd"], rel=1e-6)
    else:
        assert logged["energy"][1] == pytest.approx(ETHANOL_ENERGY_STD, rel=1e-6)


# ---- the demo end to end: train, predict, relax ----------------------------------------------

#: the demo files as written, run from a folder laid out as the repo root, shrunk on the command
#: line: the tiny eSEN, 8 training frames in 2 steps of 4, 2 validation frames
DEMO_TRAIN = [
    *SHRINK,
    "--dataset.train.train_split_settings.first_n=8",
    "--dataset.train.val_split_settings.first_n=2",
    "--dataset.train.test_split_settings.first_n=4",
    "--optim.batch_size=4",
    "--optim.eval_batch_size=4",
    "--optim.num_workers=0",
    "--optim.max_epochs=1",
    "--optim.scheduler_params.warmup_epochs=0.5",
]


@pytest.mark.slow
def test_demo_trains_predicts_and_relaxes_through_the_stock_cli(demo_root: Path) -> None:
    """configs/demo/esen_dens.yml trains (DeNS on, gradient forces), predicts the test split from
    its checkpoint, and configs/demo/esen_dens_relax.yml relaxes the IS2RE structures with it."""
    from test_inference import RELAX_OK

    run = demo_root / "run"
    output = run_cli(
        "--mode",
        "train",
        "--config-yml",
        str(CONFIGS / "demo/esen_dens.yml"),
        "--cpu",
        "--run-dir",
        str(run),
        "--identifier",
        "train",
        "--print-every",
        "1",
        *DEMO_TRAIN,
        cwd=demo_root,
    )
    assert "step: 2.00e+00" in output and "step: 3.00e+00" not in output
    for term in ("loss_energy", "loss_forces", "loss_dens", "dens_structure_fraction"):
        assert f"{term}:" in output
    logged = logged_normalizers(output)
    assert logged["energy"][1] == logged["forces"][1] == pytest.approx(DEMO_ENERGY_STD)
    checkpoint = next(run.glob("checkpoints/*-train/checkpoint.pt"))

    run_cli(
        "--mode",
        "predict",
        "--config-yml",
        str(CONFIGS / "demo/esen_dens.yml"),
        "--cpu",
        "--run-dir",
        str(run),
        "--identifier",
        "predict",
        "--checkpoint",
        str(checkpoint),
        "--dataset.test.src=data/demo/oc20/test",
        *DEMO_TRAIN,
        cwd=demo_root,
    )
    predictions = next(run.glob("results/*-predict/*_predictions.npz"))
    with np.load(predictions, allow_pickle=True) as results:
        assert len(results["ids"]) == 4
        assert np.isfinite(results["energy"].astype(float)).all()
        assert np.isfinite(results["forces"].astype(float)).all()

    if not RELAX_OK:  # fairchem 1.10's relaxations need ase < 3.26 (tests/test_inference.py)
        pytest.skip("fairchem 1.10 relaxations need ase < 3.26")
    traj = run / "traj"
    run_cli(
        "--mode",
        "run-relaxations",
        "--config-yml",
        str(CONFIGS / "demo/esen_dens_relax.yml"),
        "--cpu",
        "--run-dir",
        str(run),
        "--checkpoint",
        str(checkpoint),
        "--timestamp-id",
        "relax",
        "--task.relaxation_steps=3",
        f"--task.relax_opt.traj_dir={traj}",
        *DEMO_TRAIN,
        cwd=demo_root,
    )
    with np.load(run / "results" / "relax" / "relaxed_energies.npz") as energies:
        assert len(energies["ids"]) > 0 and np.isfinite(energies["energy"]).all()
    first_traj = sorted(traj.glob("*.traj"))[0]
    first, last = ase.io.read(first_traj, 0), ase.io.read(first_traj, -1)
    assert np.abs(last.positions - first.positions).max() > 1e-6  # the atoms moved


# ---- stress: the conserving eSEN on bulk cells ----------------------------------------------


def bulk_esen_config(bulk: Path) -> dict[str, Any]:
    """The demo eSEN + DeNS with stress = (1/V)·dE/dε (esen_mlp_efs_head, regress_stress) on
    the generated bulk cells, tiny: the energy (referenced, normalised), forces and full stress
    tensor are trained, forces and stress in units of the energy's σ (gradients of E/σ)."""
    demo = yaml.safe_load((CONFIGS / "demo/esen_dens.yml").read_text())
    bulk_demo = yaml.safe_load((CONFIGS / "demo/equiformer_v2_dens_bulk.yml").read_text())
    written = yaml.safe_load((bulk / "normalizers.yml").read_text())["dataset"]["train"]
    energy = written["transforms"]["normalizer"]["energy"]
    sigma = {"mean": 0.0, "rmsd": energy["rmsd"]}
    backbone = {**demo["model"]["backbone"], **TINY_ESEN, "regress_stress": True}
    return {
        "trainer": "fairchem_dens.trainer.DeNSTrainer",
        "logger": "tensorboard",
        "outputs": {
            "energy": {"level": "system"},
            "forces": {"level": "atom", "train_on_free_atoms": True, "eval_on_free_atoms": True},
            "stress": {"level": "system"},  # the efs head's 9 components
        },
        "loss_functions": [  # configs/omat24's coefficients; the stress as one tensor
            {"energy": {"fn": "per_atom_mae", "coefficient": 5}},
            {"forces": {"fn": "l2mae", "coefficient": 20}},
            {"stress": {"fn": "mae", "coefficient": 5}},
        ],
        "evaluation_metrics": {
            "primary_metric": "energy_mae",
            "metrics": {"energy": ["mae"], "forces": ["mae"], "stress": ["mae"]},
        },
        "dataset": {
            "train": {
                "format": "fairchem_dens.datasets.DeNSAseDBDataset",
                "src": str(bulk / "train"),
                "a2g_args": {"r_energy": True, "r_forces": True, "r_stress": True},
                "train_split_settings": {"first_n": 8},
                "transforms": {
                    "normalizer": {"energy": energy, "forces": sigma, "stress": sigma},
                    "element_references": written["transforms"]["element_references"],
                },
            },
            "val": {"src": str(bulk / "val"), "first_n": 4},
        },
        "model": {**demo["model"], "backbone": backbone},
        "optim": {
            "batch_size": 4,
            "eval_batch_size": 4,
            "num_workers": 0,
            "max_epochs": 1,
            "optimizer": "AdamW",
            "lr_initial": 5e-4,
            "scheduler": "LambdaLR",
            "scheduler_params": {
                "lambda_type": "cosine",
                "warmup_factor": 0.2,
                "warmup_epochs": 0.5,
                "lr_min_factor": 0.01,
            },
            "dens": bulk_demo["optim"]["dens"],  # fairchem's MPtrj recipe, as the demo
        },
    }


@pytest.mark.slow
def test_conserving_esen_with_stress_trains_with_dens_on_bulk(bulk_data: Path, tmp_path):
    """Energy, forces and stress as derivatives of one energy train through the stock CLI with
    DeNS on; forces and stress are normalised by the energy's σ."""
    config = bulk_esen_config(bulk_data)
    path = write_config(config, tmp_path / "bulk_esen.yml")
    output = run_cli(
        "--mode",
        "train",
        "--config-yml",
        str(path),
        "--cpu",
        "--run-dir",
        str(tmp_path),
        "--print-every",
        "1",
        cwd=tmp_path,
    )
    assert "step: 2.00e+00" in output and "step: 3.00e+00" not in output
    for term in ("loss_energy", "loss_forces", "loss_stress", "loss_dens"):
        assert f"{term}:" in output
    assert "stress_mae" in output  # validated
    logged = logged_normalizers(output)
    assert logged["stress"] == logged["forces"] == (0.0, logged["energy"][1])
