"""Stress (and any system-level target other than the energy) never trains on a DeNS structure
(``trainer.system_target_keep``); the MPtrj/OMat24-style configs with a stress head train and
predict on the generated ``.aselmdb`` bulk data through the stock CLI with DeNS on."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from helpers import DEMO_DIR, TINY_EQV2, trainer_from_config

from fairchem_dens import keys
from fairchem_dens.config import DeNSConfig, DeNSConfigError
from fairchem_dens.testing import cli_config
from fairchem_dens.trainer import system_target_keep

REPO = Path(__file__).resolve().parents[1]
STRESS_PARTS = ("stress_isotropic", "stress_anisotropic")
LOSS_TARGETS = ("energy", "forces", *STRESS_PARTS)


def bulk_config(data: Path, **dens: Any) -> dict[str, Any]:
    """configs/demo/equiformer_v2_dens_bulk.yml with a tiny model on the generated bulk data."""
    config = yaml.safe_load((DEMO_DIR / "equiformer_v2_dens_bulk.yml").read_text())
    config.pop("includes")
    written = yaml.safe_load((data / "normalizers.yml").read_text())["dataset"]["train"]
    train = config["dataset"]["train"]
    train["src"] = str(data / "train")
    train["transforms"].update(written["transforms"])
    config["dataset"]["val"] = {"src": str(data / "val")}
    backbone = config["model"]["backbone"]
    keep = ("model", "use_force_encoding", "use_sigma_encoding", "use_pbc_single")
    for key in [k for k in backbone if k not in keep]:
        del backbone[key]
    backbone.update(TINY_EQV2)
    config["optim"].update(
        batch_size=4, eval_batch_size=8, num_workers=0, max_epochs=1, eval_every=1000
    )
    config["optim"]["scheduler_params"]["warmup_epochs"] = 0.2
    config["optim"]["dens"].update(dens)
    return config


def first_batch(trainer: Any) -> Any:
    trainer.enable_dens_on_train_data()
    trainer.train_sampler.set_epoch_and_start_iteration(0, 0)
    return next(iter(trainer.train_loader))


def offset_outputs(trainer: Any, batch: Any, offset: float = 1.0) -> dict[str, torch.Tensor]:
    """Predictions = normalised targets + ``offset`` (each loss row then costs ``offset``), as
    leaves that collect gradients; the noise prediction is exact."""
    out = {}
    for name in LOSS_TARGETS:
        target = batch[name].view(batch[name].shape[0], -1).clone().double()
        if name in trainer.elementrefs:
            target = trainer.elementrefs[name].dereference(target, batch)
        if name in trainer.normalizers:
            target = trainer.normalizers[name].norm(target)
        out[name] = (target + offset).float().requires_grad_()
    out[keys.NOISE_OUTPUT] = batch[keys.DENS_TARGET].clone()  # a declared model output
    return out


# ---- the rule ------------------------------------------------------------------------------


def test_system_target_keep_rule():
    is_dens = torch.tensor([True, False, True])
    on, off = DeNSConfig(energy_on_dens=True), DeNSConfig(energy_on_dens=False)
    everything, original = [True, True, True], [False, True, False]
    assert system_target_keep("energy", {}, is_dens, on).tolist() == everything  # Eq. 6
    assert system_target_keep("energy", {}, is_dens, off).tolist() == original  # Table 1e idx 3
    for name in ("stress", *STRESS_PARTS):
        spec = {"parent": "stress"} if name != "stress" else {}
        assert system_target_keep(name, spec, is_dens, on).tolist() == original, name
    listed = DeNSConfig(energy_targets=("energy", "stress"))
    part = system_target_keep("stress_isotropic", {"parent": "stress"}, is_dens, listed)
    assert part.tolist() == everything  # a part follows its parent's name


# ---- the trainer on the generated bulk data ------------------------------------------------


def test_dens_only_batch_stress_term_is_zero_and_gives_no_gradient(bulk_data, tmp_path):
    config = bulk_config(bulk_data, prob=1.0)
    with trainer_from_config(config, tmp_path) as trainer:
        batch = first_batch(trainer)
        assert batch[keys.DENS_STRUCTURE].all() and batch[keys.DENS_MASK].all()
        out = offset_outputs(trainer, batch)
        loss = trainer._compute_loss(out, batch)
        loss.backward()
        log = trainer._dens_log
        for name in STRESS_PARTS:
            assert log[f"loss_{name}"] == 0.0, name
            assert torch.equal(out[name].grad, torch.zeros_like(out[name])), name
        assert log["loss_energy"] > 0 and out["energy"].grad.abs().sum() > 0  # Eq. 6
        assert log["loss_forces"] == 0.0  # every atom is corrupted (Alg. 1 l.31)


def test_mixed_batch_stress_term_is_the_mean_over_original_structures(bulk_data, tmp_path):
    """With every row off by 1 (normalised units), the stress terms are Σ_original 1 / B; moving
    a DeNS structure's stress prediction changes nothing, an original one's does."""
    config = bulk_config(bulk_data, prob=0.5)
    with trainer_from_config(config, tmp_path) as trainer:
        batch = first_batch(trainer)
        is_dens = batch[keys.DENS_STRUCTURE]
        assert is_dens.any() and (~is_dens).any()
        out = offset_outputs(trainer, batch)
        trainer._compute_loss(out, batch)
        expected = float((~is_dens).sum()) / is_dens.numel()
        for name in STRESS_PARTS:
            assert trainer._dens_log[f"loss_{name}"] == pytest.approx(expected, rel=1e-5)

        def loss_with(rows: torch.Tensor) -> float:
            moved = {k: v.detach().clone() for k, v in out.items()}
            for name in STRESS_PARTS:
                moved[name][rows] += 3.0
            return float(trainer._compute_loss(moved, batch))

        base = float(trainer._compute_loss({k: v.detach() for k, v in out.items()}, batch))
        assert loss_with(is_dens) == pytest.approx(base, abs=1e-6)
        assert loss_with(~is_dens) > base + 1.0


def test_energy_targets_naming_no_system_target_is_a_clear_error(bulk_data, tmp_path):
    config = bulk_config(bulk_data, energy_targets=["energy", "stres"])
    with pytest.raises(DeNSConfigError, match=r"^optim\.dens\.energy_targets: 'stres' is not"):
        with trainer_from_config(config, tmp_path):
            pass


def test_status_fractions_include_opt_outs_and_the_stress_filter(bulk_data, tmp_path):
    config = bulk_config(bulk_data, prob=1.0, max_stress_norm=0.02)
    with trainer_from_config(config, tmp_path) as trainer:
        batch = first_batch(trainer)
        trainer._compute_loss(offset_outputs(trainer, batch), batch)
        log, status = trainer._dens_log, batch[keys.DENS_STATUS]
        fraction = float((status == 7).float().mean())
        assert log["dens_max_stress_fraction"] == pytest.approx(fraction)
        assert log["dens_eligible_fraction"] == pytest.approx(1.0 - fraction)
        assert "dens_opt_out_fraction" in log


# ---- stock CLI: train then predict in one process (fairchem's e2e test_s2efs flow) ---------


def test_bulk_aselmdb_trains_and_predicts_stress_through_the_cli(bulk_data, tmp_path):
    from fairchem.core.common.registry import registry

    config = bulk_config(bulk_data, prob=0.5)
    config["dataset"]["train"]["train_split_settings"] = {"first_n": 12}
    config["optim"]["scheduler_params"]["warmup_epochs"] = 0.34  # one warm-up step of three
    config["optim"]["eval_every"] = 3  # validate (and save the checkpoint) after the last step
    config["dataset"]["test"] = {"src": str(bulk_data / "test")}
    with trainer_from_config(config, tmp_path / "train") as trainer:
        assert type(trainer.train_dataset.dataset).__name__ == "DeNSAseDBDataset"
        trainer.train(disable_eval_tqdm=True)
        assert trainer.step == 3
        log = trainer._dens_log
        assert 0 < log["dens_structure_fraction"] <= 1 and log["loss_dens"] > 0
    checkpoint = next((tmp_path / "train").glob("checkpoints/*/checkpoint.pt"))

    run = tmp_path / "predict"
    args = ["--checkpoint", str(checkpoint)]
    built = cli_config(copy.deepcopy(config), run, mode="predict", extra_args=args)
    with trainer_from_config_mode(config, run, "predict", args) as trainer:
        task = registry.get_task_class("predict")(built)
        task.setup(trainer)
        task.run()  # fairchem's PredictTask: trainer.predict(test_loader, "predictions")
        results = Path(trainer.config["cmd"]["results_dir"]) / "ocp_predictions.npz"
    with np.load(results, allow_pickle=True) as predictions:
        n = len(predictions["ids"])
        assert n == len(list_rows(bulk_data / "test"))
        assert predictions["energy"].shape[0] == n
        assert np.asarray(predictions["stress"]).reshape(n, -1).shape == (n, 9)
        assert np.isfinite(np.asarray(predictions["stress"], dtype=float)).all()


def list_rows(split: Path) -> list[int]:
    return list(np.load(split / "metadata.npz")["natoms"])


def trainer_from_config_mode(config: dict[str, Any], run_dir: Path, mode: str, args: list[str]):
    from fairchem_dens.testing import cli_trainer

    return cli_trainer(config, run_dir, mode=mode, extra_args=args)
