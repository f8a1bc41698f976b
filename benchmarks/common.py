"""Shared pieces of the benchmark scripts: the benchmark dataset, the model/trainer configs of
every variant, building a trainer exactly as the stock ``fairchem`` CLI does, machine facts and
timing statistics.

Nothing here is imported by the package or the tests. Scripts run from the repository root:
``.venv/bin/python benchmarks/<script>.py``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: Generated data and run directories live under the repository's git-ignored folders.
DATA = ROOT / "data" / "bench"
RUNS = ROOT / "runs" / "bench"

#: The held-out benchmark dataset: generated once with these arguments, never edited by hand.
DATA_ARGS = dict(variant="oc20", systems=120, seed=2024, max_steps=50)

#: The paper's DeNS settings scaled to this data (Table 7/8: p_DeNS 0.5, λ_DeNS 10, r_DeNS 1 on
#: free atoms, multi-scale σ in [0.01, σ_high] with T = 50).
DENS = dict(
    prob=0.5, sigma_low=0.01, sigma_high=0.5, num_sigmas=50, corrupt_ratio=1.0, coefficient=10.0
)

#: A small EquiformerV2 (arguments of fairchem's EquiformerV2Backbone), the demo model shrunk to
#: what a 2-core CPU trains in minutes.
EQV2 = dict(
    use_pbc=True,
    regress_forces=True,
    otf_graph=True,
    max_neighbors=16,
    max_radius=5.0,
    max_num_elements=90,
    num_layers=2,
    sphere_channels=32,
    attn_hidden_channels=16,
    num_heads=4,
    attn_alpha_channels=8,
    attn_value_channels=8,
    ffn_hidden_channels=32,
    norm_type="layer_norm_sh",
    lmax_list=[2],
    mmax_list=[2],
    grid_resolution=12,
    num_sphere_samples=128,
    edge_channels=32,
    use_atom_edge_embedding=True,
    share_atom_edge_embedding=False,
    distance_function="gaussian",
    num_distance_basis=32,
    attn_activation="silu",
    use_s2_act_attn=False,
    use_attn_renorm=True,
    ffn_activation="silu",
    use_gate_act=False,
    use_grid_mlp=True,
    use_sep_s2_act=True,
    alpha_drop=0.0,
    drop_path_rate=0.0,
    proj_drop=0.0,
    weight_init="uniform",
)

#: A small eSCN (arguments of fairchem's eSCNBackbone).
ESCN = dict(
    use_pbc=True,
    regress_forces=True,
    otf_graph=True,
    max_neighbors=16,
    cutoff=5.0,
    max_num_elements=90,
    num_layers=2,
    lmax_list=[2],
    mmax_list=[2],
    sphere_channels=32,
    hidden_channels=64,
    edge_channels=32,
    num_sphere_samples=128,
    distance_function="gaussian",
    basis_width_scalar=1.0,
    distance_resolution=0.1,
)
#: A small energy-conserving eSEN (fairchem eSEN_Backbone arguments) at the size of the eSCN
#: above; forces = −∂E/∂r through ``esen_mlp_efs_head``.
ESEN = dict(
    use_pbc=True,
    otf_graph=True,
    max_neighbors=16,
    cutoff=5.0,
    max_num_elements=90,
    num_layers=2,
    lmax=2,
    mmax=2,
    sphere_channels=32,
    hidden_channels=64,
    edge_channels=32,
    num_distance_basis=32,
    distance_function="gaussian",
    norm_type="rms_norm_sh",
    act_type="gate",
    mlp_type="grid",
    use_envelope=True,
    direct_forces=False,
    regress_forces=True,
)
BACKBONES = {"eqv2": EQV2, "escn": ESCN, "esen": ESEN}


def pin_code() -> dict[str, Any]:
    """Choose the ``fairchem_dens`` code the benchmark imports; call before importing it.

    ``BENCH_CODE=head`` (used for the committed results, since others may be editing the shared
    checkout during a long sweep) imports a snapshot of the committed ``HEAD`` (``git archive``
    into ``runs/bench/code/<commit>``), also in subprocesses; otherwise the working tree.
    """
    pinned = os.environ.get("BENCH_CODE_PATH")
    if pinned:  # a subprocess of a pinned benchmark: the parent's snapshot
        sys.path.insert(0, pinned)
        return {"code": "committed HEAD snapshot", "commit": Path(pinned).name, "path": pinned}
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "fairchem_dens"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    if os.environ.get("BENCH_CODE", "worktree") != "head":
        return {"code": "working tree", "commit": commit, "fairchem_dens_modified": bool(dirty)}
    target = RUNS / "code" / commit
    if not (target / "fairchem_dens" / "__init__.py").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", "HEAD", "fairchem_dens"], capture_output=True, check=True, cwd=ROOT
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    sys.path.insert(0, str(target))
    os.environ["BENCH_CODE_PATH"] = str(target)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(target), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return {"code": "committed HEAD snapshot", "commit": commit, "path": str(target)}


def ensure_data() -> Path:
    """Generate the benchmark dataset (OC20 style) if it is not there; returns ``<DATA>/oc20``."""
    target = DATA / "oc20"
    if not (target / "normalizers.yml").exists():
        from fairchem_dens.data import generate

        generate(DATA, workers=2, **DATA_ARGS)
    return target


def data_copy(name: str) -> Path:
    """A private copy of the benchmark data (lmdb 3 opens one file once per process): used when
    several trainers live in one process."""
    source = ensure_data()
    target = DATA / f"copy_{name}" / "oc20"
    if not (target / "normalizers.yml").exists():
        shutil.copytree(source, target, dirs_exist_ok=True)
    return target


def base_config(data: Path, steps_per_epoch_hint: int | None = None) -> dict[str, Any]:
    """Losses, metrics, data and optimiser shared by every variant (the demo's base.yml)."""
    normalizers = yaml.safe_load((data / "normalizers.yml").read_text())
    return {
        "logger": "tensorboard",
        "outputs": {
            "energy": {"shape": 1, "level": "system"},
            "forces": {
                "irrep_dim": 1,
                "level": "atom",
                "train_on_free_atoms": True,
                "eval_on_free_atoms": True,
            },
        },
        "loss_functions": [
            {"energy": {"fn": "mae", "coefficient": 2}},  # λ_E (Table 7)
            {"forces": {"fn": "l2mae", "coefficient": 100}},  # λ_F (Table 7)
        ],
        "evaluation_metrics": {
            "metrics": {"energy": ["mae"], "forces": ["mae", "cosine_similarity"]},
            "primary_metric": "forces_mae",
        },
        "dataset": {
            "train": {
                "format": "fairchem_dens.datasets.DeNSLmdbDataset",
                "src": str(data / "train"),
                "key_mapping": {"y": "energy", "force": "forces"},
                **normalizers["dataset"]["train"],
            },
            "val": {"src": str(data / "val")},
        },
        "optim": {
            "batch_size": 8,
            "eval_batch_size": 32,
            "num_workers": 0,
            "load_balancing": "atoms",
            "max_epochs": 1,
            "optimizer": "AdamW",
            "optimizer_params": {"weight_decay": 0.001},
            "lr_initial": 0.001,
            "scheduler": "LambdaLR",
            "scheduler_params": {
                "lambda_type": "cosine",
                "warmup_factor": 0.2,
                "warmup_epochs": 0.05,
                "lr_min_factor": 0.01,
            },
            "clip_grad_norm": 100,
            "ema_decay": 0.99,
        },
    }


def variant_config(
    variant: str, data: Path, dens: dict[str, Any] | None = None, model: str = "eqv2"
) -> dict[str, Any]:
    """The full config of one variant.

    Args:
        variant: ``plain`` (no DeNS: ``optim.dens`` absent, noise head present but never run),
            ``dens`` (ours), ``dens_nofe`` (ours without force encoding, Table 1e idx 2),
            ``builtin`` (fairchem 1.10's ``equiformerv2_dens`` trainer and model),
            ``builtin_noextra`` (the same without its extra force term), or ``stock``
            (fairchem's own EquiformerV2/eSCN backbone, heads and trainer: the parent).
        data: the ``oc20`` folder of a generated dataset.
        dens: DeNS settings (default :data:`DENS`).
        model: ``eqv2``, ``escn`` or ``esen`` (energy-conserving).
    """
    dens = dict(DENS if dens is None else dens)
    config = base_config(data)
    backbone_args = copy.deepcopy(BACKBONES[model]) if model in BACKBONES else None
    if model == "eqv2":
        heads = {
            "energy": {"module": "equiformerV2_scalar_head"},
            "forces": {"module": "equiformerV2_vector_head"},
            "dens_noise": {"module": "fairchem_dens.heads.EqV2NoiseHead"},
        }
        ours = "fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone"
        stock = "equiformer_v2_backbone"
    elif model == "escn":
        heads = {
            "energy": {"module": "escn_energy_head"},
            "forces": {"module": "escn_force_head"},
            "dens_noise": {"module": "fairchem_dens.heads.eSCNNoiseHead"},
        }
        ours = "fairchem_dens.models.escn.DeNSeSCNBackbone"
        stock = "escn_backbone"
    elif model == "esen":
        heads = {
            "efs": {"module": "esen_mlp_efs_head"},
            "dens_noise": {"module": "fairchem_dens.heads.eSENNoiseHead"},
        }
        ours = "fairchem_dens.models.esen.DeNSeSENBackbone"
        stock = "esen_backbone"
        # gradient forces: forces in units of the energy's std, F/σ_E = −∂(E/σ_E)/∂r
        normalizer = config["dataset"]["train"]["transforms"]["normalizer"]
        normalizer["forces"] = {"mean": 0.0, "rmsd": normalizer["energy"]["rmsd"]}
    else:
        raise ValueError(f"model={model!r}: must be one of {list(BACKBONES)}")

    if variant in ("plain", "dens", "dens_nofe"):
        config["trainer"] = "fairchem_dens.trainer.DeNSTrainer"
        backbone = {"model": ours, "use_force_encoding": variant == "dens", **backbone_args}
        if variant == "plain":
            # the parent model: no noise head, no force encoding (with them, DDP stops on their
            # unused parameters when optim.dens is absent; see docs/benchmarks.md)
            heads.pop("dens_noise")
        else:
            config["optim"]["dens"] = {**dens, "candidates": "free"}
    elif variant == "stock":
        # fairchem's own trainer of the family (eSEN's: mlip_trainer)
        config["trainer"] = "mlip_trainer" if model == "esen" else "equiformerv2_forces"
        config["dataset"]["train"]["format"] = "lmdb"
        backbone = {"model": stock, **backbone_args}
        heads.pop("dens_noise")
    elif variant in ("builtin", "builtin_noextra"):
        if model != "eqv2":
            raise ValueError("fairchem 1.10 has a built-in DeNS trainer for EquiformerV2 only")
        config["trainer"] = "equiformerv2_dens"
        if variant == "builtin_noextra":  # benchmarks/builtin_fixed.py: minus the extra term
            config["trainer"] = "builtin_fixed.BuiltinDeNSWithoutExtraForceTerm"
        config["dataset"]["train"]["format"] = "lmdb"
        backbone = {"model": "equiformer_v2_dens_backbone", "use_force_encoding": True}
        backbone.update(backbone_args)
        heads = {
            "energy": {"module": "eqV2_DeNS_scalar_head"},
            "forces": {"module": "eqV2_DeNS_vector_head"},
        }
        multi_scale = dens.get("sigma") is None
        config["optim"]["use_denoising_pos"] = True
        config["optim"]["denoising_pos_coefficient"] = dens["coefficient"]
        config["optim"]["denoising_pos_params"] = {
            "prob": dens["prob"],
            "fixed_noise_std": not multi_scale,
            "std": dens.get("sigma"),
            "std_low": dens["sigma_low"],
            "std_high": dens["sigma_high"],
            "num_steps": dens["num_sigmas"],
            "corrupt_ratio": dens["corrupt_ratio"],
            "all_atoms": False,  # OC20: only free atoms are moved
        }
    else:
        raise ValueError(f"variant={variant!r}")
    config["model"] = {
        "name": "hydra",
        "pass_through_head_outputs": True,
        "otf_graph": True,
        "backbone": backbone,
        "heads": heads,
    }
    return config


QUIET = ("--print-every", "1000000")


@contextlib.contextmanager
def trainer_from_config(
    config: dict[str, Any], run_dir: Path, seed: int = 0, mode: str = "train"
) -> Iterator[Any]:
    """Build the trainer exactly as the stock CLI does (``fairchem --mode train --cpu``): its
    config builder and trainer context in this process, with a one-process gloo group."""
    from fairchem_dens.testing import cli_trainer

    with cli_trainer(config, run_dir, seed, mode, extra_args=QUIET) as trainer:
        yield trainer


def build_config_dict(
    config: dict[str, Any], run_dir: Path, seed: int = 0, mode: str = "train"
) -> dict[str, Any]:
    """The config dict the stock CLI builds from a YAML file and its flags."""
    from fairchem_dens.testing import cli_config

    return cli_config(config, run_dir, seed, mode, extra_args=QUIET)


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """The one-process gloo group the stock CLI sets up (several trainers can share it)."""
    from fairchem.core.common import distutils
    from fairchem.core.common.utils import setup_env_vars, setup_imports, setup_logging

    setup_logging()
    setup_env_vars()
    distutils.setup_env_local()
    built = build_config_dict({}, RUNS / "process_group")
    distutils.setup(built)
    setup_imports(built)
    try:
        yield
    finally:
        distutils.cleanup()


def build_trainer(config: dict[str, Any], run_dir: Path, seed: int = 0) -> Any:
    """A trainer built with the arguments ``new_trainer_context`` passes (inside
    :func:`process_group`); several may live in one process if their LMDB files differ."""
    from fairchem.core.common.registry import registry

    built = build_config_dict(config, run_dir, seed)
    name = built.get("trainer", "ocp")
    task_name = "s2ef" if name in ("forces", "equiformerv2_forces") else "ocp"
    return registry.get_trainer_class(name)(
        task=built.get("task", {}),
        model=built["model"],
        outputs=built.get("outputs", {}),
        dataset=built["dataset"],
        optimizer=built["optim"],
        loss_functions=built.get("loss_functions", {}),
        evaluation_metrics=built.get("evaluation_metrics", {}),
        identifier=built["identifier"],
        timestamp_id=built.get("timestamp_id"),
        run_dir=built.get("run_dir", "./"),
        is_debug=built.get("is_debug", False),
        print_every=built.get("print_every", 10),
        seed=built.get("seed", 0),
        logger=built.get("logger", "wandb"),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        amp=built.get("amp", False),
        cpu=built.get("cpu", False),
        slurm=built.get("slurm", {}),
        name=task_name,
        gp_gpus=built.get("gp_gpus"),
    )


def eval_loader(trainer: Any, overrides: dict[str, Any]) -> Any:
    """A loader of one more labelled split, built as fairchem builds its val loader (the train
    split's settings, ``use_train_settings``, updated with ``overrides``: ``src``, ``sample_n``)."""
    from fairchem.core.datasets.base_dataset import create_dataset

    train = trainer.config["dataset"]  # fairchem keeps the train split's settings here
    config = {k: v for k, v in train.items() if k not in ("sample_n", "first_n")}
    dataset = create_dataset({**config, **overrides}, "val")
    optim = trainer.config["optim"]
    sampler = trainer.get_sampler(
        dataset, optim.get("eval_batch_size", optim["batch_size"]), shuffle=False
    )
    return trainer.get_dataloader(dataset, sampler)


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (``uptime``)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """Facts about the machine and software the figures were measured on."""
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    from importlib import metadata

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": "none (no GPU lent to this task: CPU figures only)",
        "torch": torch.__version__,
        "fairchem_core": metadata.version("fairchem-core"),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "uptime": uptime,
        "load_average": load_average(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def stats(values: list[float] | np.ndarray) -> dict[str, float]:
    """Median, quartiles, IQR, mean and count of a sample."""
    array = np.asarray(values, dtype=float)
    q1, median, q3 = np.percentile(array, [25, 50, 75])
    return {
        "median": float(median),
        "q1": float(q1),
        "q3": float(q3),
        "iqr": float(q3 - q1),
        "mean": float(array.mean()),
        "n": int(array.size),
    }


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")


#: One curve of a panel: (label, line style, runs), each run a list of (step, {"energy_mae",
#: "forces_mae"} in eV and eV/Å) points.
Curve = tuple[str, str, list[list[tuple[int, dict[str, float]]]]]


def plot_curves(panels: list[tuple[str, list[Curve]]], path: Path, title: str) -> None:
    """Energy and force MAE (meV, meV/Å) vs step, mean ± std over runs: a row per panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for row, (panel, curves) in enumerate(panels):
        for col, (key, unit) in enumerate((("energy_mae", "meV"), ("forces_mae", "meV/Å"))):
            ax = axes[row, col]
            for index, (label, style, runs) in enumerate(curves):
                if not runs:
                    continue
                steps = np.array([step for step, _ in runs[0]])
                values = np.array([[point[key] * 1000 for _, point in run] for run in runs])
                mean, std = values.mean(0), values.std(0)
                color = f"C{index}"
                label = f"{label} (n={len(runs)})"
                ax.plot(steps, mean, style, marker="o", ms=3, color=color, label=label)
                ax.fill_between(steps, mean - std, mean + std, alpha=0.15, color=color)
            ax.set_title(f"{panel}: {key.replace('_', ' ')}", fontsize=9)
            ax.set_ylabel(unit)
            ax.set_xlabel("training step")
            ax.grid(alpha=0.3)
            if col == 1:
                ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
