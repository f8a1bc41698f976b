"""Shared test helpers: tiny models, synthetic batches and an equivariance helper that rotates
every geometric input of a batch at once (positions, cell, encoded forces), as e3nn's tests do."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from e3nn import o3
from torch_geometric.data import Batch, Data

from fairchem_dens import keys
from fairchem_dens.testing import cli_trainer

#: A tiny EquiformerV2 backbone (arguments of fairchem's EquiformerV2Backbone).
TINY_EQV2 = dict(
    use_pbc=True,
    otf_graph=True,
    max_neighbors=12,
    max_radius=5.0,
    num_layers=1,
    sphere_channels=8,
    attn_hidden_channels=8,
    num_heads=2,
    attn_alpha_channels=4,
    attn_value_channels=4,
    ffn_hidden_channels=8,
    lmax_list=[2],
    mmax_list=[1],
    grid_resolution=16,  # the S2 grid: at 8 its aliasing alone breaks equivariance by ~1e-3
    num_sphere_samples=16,
    edge_channels=8,
    num_distance_basis=16,
    alpha_drop=0.0,
    drop_path_rate=0.0,
    proj_drop=0.0,
)

EQV2_HEADS = {
    "energy": {"module": "equiformerV2_scalar_head"},
    "forces": {"module": "equiformerV2_vector_head"},
}
NOISE_HEAD = {"dens_noise": {"module": "fairchem_dens.heads.EqV2NoiseHead"}}


def hydra(backbone: dict[str, Any], heads: dict[str, Any]) -> torch.nn.Module:
    """fairchem's HydraModel (pass-through outputs) in eval mode."""
    from fairchem.core.common.utils import setup_imports
    from fairchem.core.models.base import HydraModel

    setup_imports()  # fairchem's registry, as its CLI fills it

    model = HydraModel(
        backbone=copy.deepcopy(backbone), heads=copy.deepcopy(heads), pass_through_head_outputs=True
    )
    return model.eval()


def random_structure(num_atoms: int, generator: torch.Generator, box: float = 6.0) -> Data:
    """A random periodic structure with atomic numbers of EMT metals and adsorbates."""
    elements = torch.tensor([1, 6, 7, 8, 13, 28, 29, 46, 47, 78, 79], dtype=torch.float)
    return Data(
        pos=torch.rand(num_atoms, 3, generator=generator) * box,
        cell=(torch.eye(3) * box).unsqueeze(0),
        atomic_numbers=elements[torch.randint(len(elements), (num_atoms,), generator=generator)],
        natoms=num_atoms,
        pbc=torch.tensor([[True, True, True]]),
        fixed=torch.zeros(num_atoms),
        tags=torch.ones(num_atoms, dtype=torch.long),
    )


def random_batch(sizes: tuple[int, ...] = (7, 5), seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    return Batch.from_data_list([random_structure(n, generator) for n in sizes])


def with_dens_fields(batch: Batch, seed: int = 1, corrupted_fraction: float = 0.5) -> Batch:
    """A copy of ``batch`` carrying DeNS fields with random masks, σ and force inputs."""
    generator = torch.Generator().manual_seed(seed)
    batch = batch.clone()
    n, b = batch.pos.shape[0], batch.natoms.numel()
    mask = torch.rand(n, generator=generator) < corrupted_fraction
    batch[keys.DENS_MASK] = mask
    batch[keys.DENS_STRUCTURE] = torch.ones(b, dtype=torch.bool)
    batch[keys.DENS_SIGMA] = torch.rand(b, generator=generator) * 0.5 + 0.01
    batch[keys.DENS_TARGET] = torch.randn(n, 3, generator=generator) * mask[:, None]
    batch[keys.DENS_FORCE_INPUT] = torch.randn(n, 3, generator=generator) * mask[:, None]
    batch[keys.DENS_STATUS] = torch.ones(b, dtype=torch.long)
    return batch


def rotate_batch(batch: Batch, rotation: torch.Tensor) -> Batch:
    """Rotate every geometric input at once: positions, cell vectors and encoded forces."""
    rotated = batch.clone()
    rotated.pos = batch.pos @ rotation.T
    rotated.cell = batch.cell @ rotation.T
    if keys.DENS_FORCE_INPUT in batch:
        rotated[keys.DENS_FORCE_INPUT] = batch[keys.DENS_FORCE_INPUT] @ rotation.T
    return rotated


def assert_equivariant(
    model: torch.nn.Module,
    batch: Batch,
    vectors: tuple[str, ...],
    scalars: tuple[str, ...] = ("energy",),
    tol: float = 1e-4,
    trials: int = 3,
) -> None:
    """Outputs named in ``scalars`` are invariant and those in ``vectors`` rotate with the inputs
    under random rotations (float32; ``tol`` relative to the output's scale)."""
    torch.manual_seed(0)
    with torch.no_grad():
        reference = model(batch)
        for _ in range(trials):
            rotation = o3.rand_matrix()
            out = model(rotate_batch(batch, rotation))
            for name in scalars:
                scale = reference[name].abs().max()
                assert scale > 0, name
                assert (out[name] - reference[name]).abs().max() / scale < tol, name
            for name in vectors:
                expected = reference[name] @ rotation.T
                scale = reference[name].abs().max()
                assert scale > 0, name
                assert (out[name] - expected).abs().max() / scale < tol, name


DEMO_DIR = Path(__file__).resolve().parents[1] / "configs" / "demo"


def demo_config(name: str = "equiformer_v2_dens.yml") -> dict[str, Any]:
    """A demo model config merged with configs/demo/base.yml, without the data include."""
    config = yaml.safe_load((DEMO_DIR / "base.yml").read_text())
    model = yaml.safe_load((DEMO_DIR / name).read_text())
    config.pop("includes")
    model.pop("includes")
    return {**config, **model}


def tiny_config(data: Path, variant: str = "oc20", **dens: Any) -> dict[str, Any]:
    """The demo config with a tiny model, pointed at a generated dataset (a YAML-able dict)."""
    config = demo_config()
    normalizers = yaml.safe_load((data / variant / "normalizers.yml").read_text())
    config["dataset"] = {
        "train": {
            "format": "fairchem_dens.datasets.DeNSLmdbDataset"
            if variant == "oc20"
            else "fairchem_dens.datasets.DeNSOC22LmdbDataset",
            "src": str(data / variant / "train"),
            "key_mapping": {"y": "energy", "force": "forces"},
            **normalizers["dataset"]["train"],
        },
        "val": {"src": str(data / variant / "val")},
    }
    backbone = config["model"]["backbone"]
    for key in list(backbone):
        if key not in ("model", "use_force_encoding", "use_sigma_encoding"):
            del backbone[key]
    backbone.update(TINY_EQV2)
    config["optim"].update(
        batch_size=4, eval_batch_size=8, num_workers=0, max_epochs=1, eval_every=1000
    )
    config["optim"]["scheduler_params"]["warmup_epochs"] = 0.2
    config["optim"]["dens"].update(dens)
    if variant == "oc22":
        config["optim"]["dens"]["candidates"] = "all"
    return config


def write_config(config: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.contextmanager
def trainer_from_config(config: dict[str, Any], run_dir: Path, seed: int = 0) -> Iterator[Any]:
    """Build the trainer exactly as the stock CLI does (fairchem's config builder and trainer
    context, a one-process gloo group), and tear the process group down afterwards."""
    with cli_trainer(config, run_dir, seed=seed) as trainer:
        yield trainer


#: A tiny eSCN backbone (arguments of fairchem's eSCNBackbone).
TINY_ESCN = dict(
    use_pbc=True,
    otf_graph=True,
    max_neighbors=12,
    cutoff=5.0,
    num_layers=2,
    lmax_list=[2],
    mmax_list=[1],
    sphere_channels=8,
    hidden_channels=16,
    edge_channels=8,
    num_sphere_samples=1024,  # eSCN's outputs sum over sphere points: at 64 the sampling
    # error of the parent itself breaks equivariance by up to ~1e-1 relative, at 1024 by ~1e-3
    distance_resolution=0.1,
    resolution=16,
)
ESCN_HEADS = {
    "energy": {"module": "escn_energy_head"},
    "forces": {"module": "escn_force_head"},
}
ESCN_NOISE_HEAD = {"dens_noise": {"module": "fairchem_dens.heads.eSCNNoiseHead"}}


FAIRCHEM = str(Path(sys.executable).with_name("fairchem"))


def run_cli(*args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [FAIRCHEM, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    return output


#: A tiny eSEN backbone (arguments of fairchem's eSEN_Backbone); ``direct_forces`` is set by the
#: heads: ``esen_mlp_efs_head`` makes it False (forces = -dE/dr, stress with regress_stress).
TINY_ESEN = dict(
    use_pbc=True,
    otf_graph=True,
    max_neighbors=12,
    cutoff=5.0,
    num_layers=1,
    lmax=2,
    mmax=2,
    sphere_channels=8,
    hidden_channels=8,
    edge_channels=8,
    num_distance_basis=16,
    grid_resolution=16,
    norm_type="rms_norm_sh",
    act_type="gate",
    mlp_type="grid",
    use_envelope=True,
)
#: energy-conserving eSEN: energy, forces = -dE/dr (and stress with ``regress_stress``)
ESEN_EFS_HEADS = {"efs": {"module": "esen_mlp_efs_head"}}
#: direct-force eSEN
ESEN_DIRECT_HEADS = {
    "energy": {"module": "esen_mlp_energy_head"},
    "forces": {"module": "esen_linear_force_head"},
}
ESEN_NOISE_HEAD = {"dens_noise": {"module": "fairchem_dens.heads.eSENNoiseHead"}}


#: Command-line overrides that shrink a run file to 2 training steps of 2 structures (the first 4)
#: and 2 validation frames; the model and data paths are the caller's.
TWO_STEP_ARGS = (
    "--dataset.train.train_split_settings.first_n=4",
    "--dataset.train.val_split_settings.first_n=2",
    "--optim.batch_size=2",
    "--optim.eval_batch_size=2",
    "--optim.num_workers=0",
    "--optim.max_epochs=1",
    "--optim.scheduler_params.warmup_epochs=0.5",  # one warm-up step of the two
)


def train_run_file(path: Path, run_dir: Path, *overrides: str) -> str:
    """``fairchem --mode train`` on a config file as written, run from ``run_dir`` (another cwd)
    with command-line ``overrides`` (``TWO_STEP_ARGS`` among them); checks that it trained exactly
    2 steps and saved a checkpoint, and returns the CLI output."""
    output = run_cli(
        "--mode",
        "train",
        "--config-yml",
        str(path),
        "--cpu",
        "--run-dir",
        str(run_dir),
        "--print-every",
        "1",
        *overrides,
        cwd=run_dir,
    )
    assert "step: 2.00e+00" in output and "step: 3.00e+00" not in output
    assert list(run_dir.glob("checkpoints/*/checkpoint.pt"))
    return output


def logged_normalizers(output: str) -> dict[str, tuple[float, float]]:
    """{target: (mean, rmsd)} of the normalizers fairchem logged at start-up."""
    return {
        target: (float(mean), float(rmsd))
        for target, mean, rmsd in re.findall(
            r"Normalization values for output (\w+): mean=(\S+), rmsd=(\S+?)\.$", output, re.M
        )
    }
