"""Drop-in fidelity: the flows of fairchem-core 1.10's own tests, rewritten here (not vendored)
with the plugin's trainer and DeNS backbones, DeNS off:

* ``tests/core/e2e/test_s2efs.py::test_smoke_s2efs_predict``: train EquiformerV2 / eSCN hydras
  with a stress head on an ``.aselmdb`` of energies, forces and stresses, then load the checkpoint
  and predict, both through fairchem's ``main`` in ONE process (the config says
  ``optim.scheduler: "Null"`` and has no ``scheduler_params``);
* ``tests/core/models/test_rank2_head.py``: the rank-2 head on the DeNS EquiformerV2 backbone;
* ``tests/core/models/test_equiformer_v2.py::test_eqv2_hydra_activation_checkpoint``: identical
  gradients with and without ``activation_checkpoint``, here with encoded forces and both DeNS
  backbones.

And nothing keeps a trainer or its datasets alive after a run: with Python's cycle collector off,
no trainer and no dataset (with its open LMDB / ASE-DB files) survives ``main``, so a second run
in the same process opens the same files again.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import glob
from collections.abc import Iterator
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.db import connect
from helpers import TINY_EQV2, TINY_ESCN, hydra, random_batch, tiny_config, with_dens_fields

from fairchem_dens import keys

# ---- fairchem's test configs, reconstructed with our names -------------------------------------

#: fairchem's tests/core/models/test_configs/test_equiformerv2_hydra.yml, our backbone
EQV2_HYDRA_BACKBONE = dict(
    model="fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone",
    use_pbc=True,
    regress_forces=True,
    otf_graph=True,
    enforce_max_neighbors_strictly=False,
    max_neighbors=1,
    max_radius=12.0,
    max_num_elements=90,
    num_layers=1,
    sphere_channels=4,
    attn_hidden_channels=4,
    num_heads=1,
    attn_alpha_channels=4,
    attn_value_channels=4,
    ffn_hidden_channels=8,
    norm_type="layer_norm_sh",
    lmax_list=[1],
    mmax_list=[1],
    grid_resolution=18,
    num_sphere_samples=128,
    edge_channels=32,
    use_atom_edge_embedding=True,
    distance_function="gaussian",
    num_distance_basis=16,
    attn_activation="silu",
    use_s2_act_attn=False,
    ffn_activation="silu",
    use_gate_act=False,
    use_grid_mlp=False,
    alpha_drop=0.0,
    drop_path_rate=0.0,
    proj_drop=0.0,
    weight_init="normal",
)
#: fairchem's tests/core/models/test_configs/test_escn_hydra.yml, our backbone
ESCN_HYDRA_BACKBONE = dict(
    model="fairchem_dens.models.escn.DeNSeSCNBackbone",
    num_layers=2,
    max_neighbors=10,
    cutoff=12.0,
    sphere_channels=8,
    hidden_channels=8,
    lmax_list=[2],
    mmax_list=[2],
    num_sphere_samples=64,
    distance_function="gaussian",
    regress_forces=True,
    use_pbc=True,
    basis_width_scalar=2.0,
    otf_graph=True,
)
HEADS = {
    "equiformer_v2": {
        "energy": {"module": "equiformer_v2_energy_head"},
        "forces": {"module": "equiformer_v2_force_head"},
    },
    "escn": {
        "energy": {"module": "escn_energy_head"},
        "forces": {"module": "escn_force_head"},
    },
}
BACKBONES = {"equiformer_v2": EQV2_HYDRA_BACKBONE, "escn": ESCN_HYDRA_BACKBONE}


def hydra_test_config(name: str) -> dict[str, Any]:
    """fairchem's test_<model>_hydra.yml with ``trainer:`` set to ours (nothing else changed)."""
    return {
        "trainer": "fairchem_dens.trainer.DeNSTrainer",
        "outputs": {
            "energy": {"property": "energy", "shape": 1, "level": "system"},
            "forces": {
                "property": "forces",
                "irrep_dim": 1,
                "level": "atom",
                "train_on_free_atoms": True,
                "eval_on_free_atoms": True,
            },
        },
        "loss_functions": [
            {"energy": {"fn": "mae", "coefficient": 2}},
            {"forces": {"fn": "l2mae", "coefficient": 100}},
        ],
        "evaluation_metrics": {
            "metrics": {
                "energy": ["mae"],
                "forces": ["mae", "cosine_similarity", "magnitude_error"],
                "misc": ["energy_forces_within_threshold"],
            },
            "primary_metric": "forces_mae",
        },
        "logger": {"name": "tensorboard"},
        "model": {
            "name": "hydra",
            "backbone": copy.deepcopy(BACKBONES[name]),
            "heads": copy.deepcopy(HEADS[name]),
        },
        "optim": {
            "batch_size": 5,
            "eval_batch_size": 2,
            "num_workers": 0,
            "lr_initial": 0.0025,
            "optimizer": "AdamW",
            "optimizer_params": {"amsgrad": True, "weight_decay": 0.0},
            "eval_every": 190,
            "max_epochs": 50,
            "force_coefficient": 20,
            "scheduler": "Null",
            "energy_coefficient": 1,
            "clip_grad_norm": 20,
            "loss_energy": "mae",
            "loss_force": "l2mae",
        },
    }


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """fairchem's e2e ``merge_dictionary``: nested dicts merge, everything else replaces."""
    for key, value in update.items():
        if isinstance(value, dict):
            base[key] = merge(base.get(key, {}), value)
        else:
            base[key] = value
    return base


# ---- an .aselmdb of energies, forces and stresses -----------------------------------------------


@pytest.fixture(scope="module")
def aselmdb(tmp_path_factory) -> dict[str, Path]:
    """Rattled, strained two-atom binaries (CsCl prototype) of EMT metals with their EMT energy,
    forces and 3x3 stress stored in ``data`` (read by ``a2g_args.r_data_keys``): 30 training,
    10 validation and 10 test structures. fairchem's fixture is one file read by all three
    splits; lmdb 3 refuses to open one file twice in a process, so each split has its own."""
    elements = ["Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt"]
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("aselmdb")
    paths = {}
    for split, count in (("train", 30), ("val", 10), ("test", 10)):
        paths[split] = root / f"{split}.aselmdb"
        with connect(str(paths[split])) as db:
            for _ in range(count):
                pair = "".join(rng.choice(elements, size=2, replace=False))
                atoms = bulk(pair, "cesiumchloride", a=float(rng.uniform(2.9, 3.3)))
                atoms.set_cell(atoms.cell * (1 + 0.02 * rng.standard_normal((3, 3))), True)
                atoms.rattle(stdev=0.05, seed=int(rng.integers(1 << 30)))
                atoms.calc = EMT()
                db.write(
                    atoms,
                    data={
                        "energy": atoms.get_potential_energy(),
                        "forces": atoms.get_forces(),
                        "stress": atoms.get_stress(voigt=False),
                    },
                )
    return paths


# ---- fairchem's main, in this process, and what stays alive ------------------------------------


@contextlib.contextmanager
def cycle_collector_off() -> Iterator[None]:
    """Objects freed only by the cycle collector stay alive (and visible) inside the block."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def alive() -> list[str]:
    """Type names of live trainers and datasets (``gc.get_objects`` also lists objects that
    only a reference cycle keeps, since the collector is off)."""
    from fairchem.core.datasets.base_dataset import BaseDataset
    from fairchem.core.trainers.base_trainer import BaseTrainer

    return sorted(
        type(o).__name__ for o in gc.get_objects() if isinstance(o, (BaseTrainer, BaseDataset))
    )


def run_main(
    config: dict[str, Any], run_dir: Path, mode: str = "train", checkpoint: Path | None = None
) -> None:
    """``fairchem --mode MODE --config-yml run_dir/config.yml --cpu`` as fairchem's e2e tests
    run it: its ``main`` in this process."""
    from fairchem.core._cli import main
    from fairchem.core.common.flags import flags

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = ["--mode", mode, "--config-yml", str(path), "--cpu", "--seed", "100"]
    argv += ["--run-dir", str(run_dir), "--logdir", str(run_dir / "logs")]
    if checkpoint is not None:
        argv += ["--checkpoint", str(checkpoint)]
    args, overrides = flags.get_parser().parse_known_args(argv)
    main(args, overrides)


def tensorboard_tags(run_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(f"{run_dir}/logs/tensorboard/*/events.out*")
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    return accumulator.Tags()["scalars"]


# ---- test_s2efs.py::test_smoke_s2efs_predict ----------------------------------------------------


NOISE_HEADS = {
    "equiformer_v2": {"module": "fairchem_dens.heads.EqV2NoiseHead"},
    "escn": {"module": "fairchem_dens.heads.eSCNNoiseHead"},
}


@pytest.mark.parametrize("dens", [False, True], ids=["dens_off", "dens_on"])
@pytest.mark.parametrize("name", ["equiformer_v2", "escn"])
def test_smoke_s2efs_train_then_predict_in_one_process(name, dens, aselmdb, tmp_path):
    """The e2e flow of fairchem's S2EFS smoke test with our trainer and DeNS backbones: train
    with a stress head, then predict from its checkpoint in the same process; no trainer or
    dataset outlives either run. DeNS off: only ``trainer:`` and the backbone names differ from
    fairchem's test. DeNS on: the training split is ``DeNSAseDBDataset``, the model has a noise
    head and ``optim.dens`` is set."""

    def split(name: str, count: int) -> dict[str, Any]:
        return {
            "src": str(aselmdb[name]),
            "format": "ase_db",
            "a2g_args": {"r_data_keys": ["energy", "forces", "stress"]},
            "sample_n": count,
        }

    updates = {
        "task": {"strict_load": False},
        "model": {
            "backbone": {"max_num_elements": 118 + 1},
            "heads": {
                "stress": {
                    "module": "rank2_symmetric_head",
                    "output_name": "stress",
                    "use_source_target_embedding": True,
                }
            },
        },
        "loss_functions": [
            {"energy": {"fn": "mae", "coefficient": 2}},
            {"forces": {"fn": "l2mae", "coefficient": 100}},
            {"stress": {"fn": "mae", "coefficient": 100}},
        ],
        "outputs": {"stress": {"level": "system", "irrep_dim": 2, "property": "stress"}},
        "evaluation_metrics": {"metrics": {"stress": ["mae", "per_atom_mae"]}},
        "dataset": {"train": split("train", 20), "val": split("val", 5), "test": split("test", 5)},
    }
    if dens:
        updates["dataset"]["train"]["format"] = "fairchem_dens.datasets.DeNSAseDBDataset"
        updates["model"]["heads"]["dens_noise"] = NOISE_HEADS[name]
        updates["optim"] = {"dens": {"prob": 0.5, "sigma": 0.1, "seed": 0}}
    train_config = merge(hydra_test_config(name), copy.deepcopy(updates))
    merge(train_config["optim"], {"max_epochs": 2, "eval_every": 4, "batch_size": 5})
    assert "scheduler_params" not in train_config["optim"]  # scheduler: "Null" alone

    with cycle_collector_off():
        run_main(train_config, tmp_path / "train")
        assert alive() == []
        (checkpoint,) = glob.glob(f"{tmp_path}/train/checkpoints/*/checkpoint.pt")
        tags = tensorboard_tags(tmp_path / "train")
        assert "train/energy_mae" in tags and "val/energy_mae" in tags
        (trained,) = glob.glob(f"{tmp_path}/train/results/*/*_predictions.npz")

        predict_config = merge(hydra_test_config(name), copy.deepcopy(updates))
        merge(predict_config["optim"], {"max_epochs": 2, "eval_every": 8, "batch_size": 5})
        run_main(predict_config, tmp_path / "predict", "predict", Path(checkpoint))
        assert alive() == []

    (predicted,) = glob.glob(f"{tmp_path}/predict/results/*/*_predictions.npz")
    for path in (trained, predicted):
        predictions = np.load(path)
        assert predictions["energy"].shape == (5, 1)
        assert predictions["forces"].shape == (10, 3)
        assert predictions["stress"].shape == (5, 9)
    if dens:  # DeNS ran: its loss terms were logged
        assert "train/loss_dens" in tags and "train/dens_structure_fraction" in tags


def test_dens_run_then_predict_on_the_same_lmdb_in_one_process(emt_data, tmp_path):
    """A DeNS run on the LMDB data through fairchem's main, then predict on the same files in
    the same process: nothing (trainer, datasets, the sampler's epoch hook) stays alive."""
    config = tiny_config(emt_data, prob=0.5)
    config["dataset"]["train"]["train_split_settings"] = {"first_n": 8}
    config["dataset"]["test"] = {"src": str(emt_data / "oc20" / "test")}
    config["optim"]["scheduler_params"]["warmup_epochs"] = 0.5
    config["optim"]["checkpoint_every"] = -1
    with cycle_collector_off():
        run_main(config, tmp_path / "train")
        assert alive() == []
        (checkpoint,) = glob.glob(f"{tmp_path}/train/checkpoints/*/checkpoint.pt")
        run_main(config, tmp_path / "predict", "predict", Path(checkpoint))
        assert alive() == []
    assert glob.glob(f"{tmp_path}/predict/results/*/*_predictions.npz")


# ---- test_rank2_head.py -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wurtzite_batch():
    from fairchem.core.datasets import data_list_collater
    from fairchem.core.preprocessing import AtomsToGraphs

    a2g = AtomsToGraphs(r_pbc=True)
    return data_list_collater([a2g.convert(bulk("ZnFe", "wurtzite", a=2.0))])


@pytest.fixture(scope="module")
def seeded_backbone():
    """fairchem's test backbone as DeNSEquiformerV2Backbone, built once after
    ``torch.manual_seed(100)``, with the RNG state that follows its construction."""
    from fairchem_dens.models.equiformer_v2 import DeNSEquiformerV2Backbone

    torch.manual_seed(100)
    backbone = DeNSEquiformerV2Backbone(
        num_layers=2,
        sphere_channels=8,
        attn_hidden_channels=8,
        num_sphere_samples=8,
        edge_channels=8,
    )
    return backbone, torch.get_rng_state()


@pytest.mark.parametrize(
    ("decompose", "edge_level_mlp", "use_source_target_embedding", "extensive"),
    list(product((True, False), repeat=4)),
)
def test_rank2_head_on_the_dens_backbone(
    wurtzite_batch,
    seeded_backbone,
    decompose,
    edge_level_mlp,
    use_source_target_embedding,
    extensive,
):
    """fairchem's rank-2 head on DeNSEquiformerV2Backbone: symmetric, and its anisotropic part
    traceless."""
    from fairchem.core.common.utils import cg_change_mat, irreps_sum
    from fairchem.core.models.equiformer_v2.heads import Rank2SymmetricTensorHead

    backbone, rng_state = seeded_backbone
    torch.set_rng_state(rng_state)  # as if the backbone had just been built (fairchem's test)
    head = Rank2SymmetricTensorHead(
        backbone=backbone,
        output_name="out",
        decompose=decompose,
        edge_level_mlp=edge_level_mlp,
        use_source_target_embedding=use_source_target_embedding,
        extensive=extensive,
    )
    out = head(wurtzite_batch, backbone(wurtzite_batch))

    def as_matrix(irreps: torch.Tensor) -> torch.Tensor:
        tensor = torch.zeros((1, irreps_sum(2)))
        tensor[:, irreps_sum(1) : irreps_sum(2)] = irreps.view(1, -1)
        return torch.einsum("ba, cb->ca", cg_change_mat(2), tensor).view(3, 3)

    if decompose:
        assert out["out_isotropic"].shape[1] == 1
        tensor = as_matrix(out["out_anisotropic"].detach())
        assert torch.diagonal(tensor).sum().item() == pytest.approx(0.0, abs=2e-8)
    else:
        tensor = out["out"].detach().view(3, 3)
    assert torch.allclose(tensor, tensor.transpose(0, 1))


# ---- test_equiformer_v2.py::test_eqv2_hydra_activation_checkpoint -------------------------------

DENS_MODELS = {
    "equiformer_v2": (
        {"model": "fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone", **TINY_EQV2},
        {
            "energy": {"module": "equiformerV2_scalar_head"},
            "forces": {"module": "equiformerV2_vector_head"},
            "dens_noise": {"module": "fairchem_dens.heads.EqV2NoiseHead"},
        },
        "blocks",
    ),
    "escn": (
        {"model": "fairchem_dens.models.escn.DeNSeSCNBackbone", **TINY_ESCN},
        {
            "energy": {"module": "escn_energy_head"},
            "forces": {"module": "escn_force_head"},
            "dens_noise": {"module": "fairchem_dens.heads.eSCNNoiseHead"},
        },
        "layer_blocks",
    ),
}


@pytest.mark.parametrize("name", list(DENS_MODELS))
def test_gradients_identical_with_and_without_activation_checkpoint(name):
    """fairchem's pattern (same weights, same RNG state, backward of energy + forces, every
    gradient equal) with encoded forces and the noise output in the sum.

    EquiformerV2 checkpoints each block and its DeNS hook sits on the edge-degree embedding,
    before them: block 0 runs again in the backward pass. fairchem 1.10's eSCNBackbone accepts
    ``activation_checkpoint`` but never checkpoints (only its legacy ``eSCN`` class does), so
    the force-encoding pre-hook on ``layer_blocks.0`` runs exactly once either way."""
    backbone, heads, blocks = DENS_MODELS[name]
    batch = with_dens_fields(random_batch((6, 5)), seed=3, corrupted_fraction=0.6)
    gradients, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(4)
        model = hydra(backbone, heads).train()
        model.backbone.activation_checkpoint = checkpointing
        count = []
        first = getattr(model.backbone, blocks)[0]
        # a pre-hook: the recomputation may stop early, before a forward hook would run
        first.register_forward_pre_hook(lambda *args, count=count: count.append(1))
        torch.manual_seed(0)  # the same random edge frames in both runs
        out = model(batch.clone())
        total = out["energy"].sum() + out["forces"].sum() + out[keys.NOISE_OUTPUT].sum()
        total.backward()
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        calls.append(len(count))
    plain, checkpointed = gradients
    assert plain.keys() == checkpointed.keys()
    assert plain["backbone.force_encoding.weight"].abs().sum() > 0  # the encoding is trained
    for parameter in plain:
        assert torch.allclose(plain[parameter], checkpointed[parameter], atol=1e-4), parameter
    assert calls == ([1, 2] if name == "equiformer_v2" else [1, 1])
