"""The DeNS trainer with eSEN: gradient (energy-conserving) forces decided per structure.

A DeNS structure's input geometry is corrupted, so the gradient forces (and stress) there are not
the label's: it trains the noise and the original energy only. Direct-force eSEN keeps Alg. 1
l.31 (forces of uncorrupted atoms). The scheduler/EMA conventions are fairchem's eSEN trainer's.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from fairchem.core.models.equiformer_v2.trainers.forces_trainer import EquiformerV2ForcesTrainer
from fairchem.core.models.esen.trainers.trainer import MLIPTrainer
from helpers import (
    ESEN_DIRECT_HEADS,
    ESEN_EFS_HEADS,
    ESEN_NOISE_HEAD,
    TINY_ESEN,
    tiny_config,
    trainer_from_config,
)
from test_trainer import hand_batch, random_outputs
from torch_geometric.data import Data

from fairchem_dens import keys
from fairchem_dens.config import DeNSConfigError
from fairchem_dens.trainer import check_stress_cell

ESEN_BACKBONE = "fairchem_dens.models.esen.DeNSeSENBackbone"


def esen_config(data, heads=ESEN_EFS_HEADS, **dens):
    """The tiny demo config with an eSEN backbone; with gradient forces the forces normaliser is
    the energy's std (F/σ_E = −∂(E/σ_E)/∂r)."""
    config = tiny_config(data, **dens)
    config["model"]["backbone"] = {
        "model": ESEN_BACKBONE,
        "use_force_encoding": True,
        **TINY_ESEN,
    }
    config["model"]["heads"] = {**heads, **ESEN_NOISE_HEAD}
    normalizer = config["dataset"]["train"]["transforms"]["normalizer"]
    normalizer["forces"] = {"mean": 0.0, "rmsd": normalizer["energy"]["rmsd"]}
    return config


@pytest.mark.parametrize(
    ("heads", "gradient"), [(ESEN_EFS_HEADS, True), (ESEN_DIRECT_HEADS, False)]
)
def test_loss_value_by_hand_for_gradient_and_direct_forces(emt_data, tmp_path, heads, gradient):
    """λ_E·L_E + λ_F·L_F + λ_DeNS·L_DeNS of a mixed batch from the formulas: with gradient
    forces the DeNS structure trains no force at all (its geometry is corrupted), with direct
    forces its uncorrupted free atoms do (Alg. 1 l.31); shared denominators B and N."""
    config = esen_config(emt_data, heads=heads, coefficient=7.0)
    with trainer_from_config(config, tmp_path) as trainer:
        assert trainer.gradient_forces is gradient
        batch = hand_batch(trainer)
        out = random_outputs(batch)
        loss = trainer._compute_loss(out, batch).item()

        mask, free = batch[keys.DENS_MASK], batch.fixed == 0
        is_dens_atom = batch[keys.DENS_STRUCTURE][batch.batch]
        assert batch[keys.DENS_STRUCTURE].tolist() == [False, True]
        assert (free & ~mask & is_dens_atom).any()  # atoms the two variants treat differently
        coefficient = {name: info["coefficient"] for name, info in trainer.loss_functions}
        energy_norm, force_norm = trainer.normalizers["energy"], trainer.normalizers["forces"]
        assert float(force_norm.rmsd) == pytest.approx(float(energy_norm.rmsd))
        d = torch.float64
        energy_target = (batch.energy.to(d) - float(energy_norm.mean)) / float(energy_norm.rmsd)
        force_target = (batch.forces.to(d) - float(force_norm.mean)) / float(force_norm.rmsd)
        energy_error = (out["energy"].detach().to(d).view(-1) - energy_target.view(-1)).abs()
        force_error = (out["forces"].detach().to(d) - force_target).norm(dim=-1)
        noise_error = (out[keys.NOISE_OUTPUT].detach().to(d) - batch[keys.DENS_TARGET].to(d)).norm(
            dim=-1
        )
        trained = free & ~is_dens_atom if gradient else free & ~mask
        atoms = (free | mask).sum().item()  # N: every loss atom counts once, whatever it trains
        expected = (
            coefficient["energy"] * energy_error.sum() / batch.natoms.numel()  # Eq. 1 / Eq. 6
            + coefficient["forces"] * force_error[trained].sum() / atoms  # Eq. 1
            + 7.0 * noise_error[mask].sum() / atoms  # Eq. 4, Alg. 1 l.30
        ).item()
        assert loss == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_dens_structure_gets_no_gradient_through_forces_or_stress_target(emt_data, tmp_path):
    """d loss / d forces is zero on every atom of a DeNS structure with gradient forces, and its
    energy still trains (energy_on_dens, Eq. 6); with energy_on_dens false it does not."""
    for energy_on_dens in (True, False):
        config = esen_config(emt_data, energy_on_dens=energy_on_dens)
        with trainer_from_config(config, tmp_path / str(energy_on_dens)) as trainer:
            batch = hand_batch(trainer)
            out = random_outputs(batch)
            trainer._compute_loss(out, batch).backward()
            dens_atoms = batch[keys.DENS_STRUCTURE][batch.batch]
            assert torch.all(out["forces"].grad[dens_atoms] == 0)
            assert out["forces"].grad[~dens_atoms & (batch.fixed == 0)].abs().sum() > 0
            assert bool(out["energy"].grad[1].abs().sum() > 0) is energy_on_dens
            assert out[keys.NOISE_OUTPUT].grad[batch[keys.DENS_MASK]].abs().sum() > 0


def test_one_forward_and_backward_per_mixed_batch(emt_data, tmp_path, monkeypatch):
    """Training with gradient forces and DeNS: one backbone forward per step, every step has a
    finite loss, the noise head and the force encoding receive gradients."""
    config = esen_config(emt_data, prob=0.5, sigma_high=0.5)
    config["optim"]["eval_every"] = 10**6
    config["dataset"]["train"]["train_split_settings"] = {"first_n": 12}  # 3 steps
    config["optim"]["scheduler_params"]["warmup_epochs"] = 0.5  # one warm-up step
    with trainer_from_config(config, tmp_path) as trainer:
        backbone = trainer._unwrapped_model.backbone
        calls = []
        backbone.register_forward_hook(lambda *_: calls.append(1))
        losses = []
        compute_loss = trainer._compute_loss

        def recording(out, batch):
            loss = compute_loss(out, batch)
            losses.append((loss.item(), bool(batch[keys.DENS_STRUCTURE].any())))
            return loss

        monkeypatch.setattr(trainer, "_compute_loss", recording)
        monkeypatch.setattr(trainer, "validate", lambda *a, **k: {})
        encoding = backbone.force_encoding.weight.detach().clone()
        trainer.train(disable_eval_tqdm=True)
        steps = len(trainer.train_loader)
        assert len(calls) == steps == len(losses)
        assert all(torch.isfinite(torch.tensor(value)) for value, _ in losses)
        assert any(dens for _, dens in losses)  # DeNS structures were drawn
        assert not torch.equal(encoding, backbone.force_encoding.weight)


def test_plain_backbone_with_dens_is_one_line(emt_data, tmp_path):
    config = esen_config(emt_data)
    config["model"]["backbone"]["model"] = "esen_backbone"
    del config["model"]["backbone"]["use_force_encoding"]
    with trainer_from_config(config, tmp_path) as trainer:  # it may validate and predict
        with pytest.raises(
            DeNSConfigError,
            match=r"^model\.backbone\.model='esen_backbone': optim\.dens needs a force-encoding",
        ) as error:
            trainer.train(disable_eval_tqdm=True)
        assert trainer.step == 0
    assert "\n" not in str(error.value)


def test_missing_noise_head_is_one_line(emt_data, tmp_path):
    config = esen_config(emt_data)
    del config["model"]["heads"]["dens_noise"]
    with trainer_from_config(config, tmp_path) as trainer:
        with pytest.raises(DeNSConfigError, match=r"^model\.heads: optim\.dens needs a DeNS"):
            trainer.train(disable_eval_tqdm=True)


@pytest.mark.parametrize(
    ("cell", "found"),
    [(None, "no cell"), (torch.zeros(1, 3, 3), "a cell of zero volume")],
)
def test_stress_without_a_cell_is_one_line(cell, found):
    """Stress asked for by the backbone (``regress_stress``) or by an output named stress, on
    training data without a periodic cell: one line naming the key and the data."""
    structure = Data(pos=torch.zeros(2, 3))
    if cell is not None:
        structure.cell = cell
    backbone = type("Backbone", (), {"regress_stress": True})()
    model = type("Model", (), {"backbone": backbone})()
    with pytest.raises(DeNSConfigError, match=rf"^model\.backbone\.regress_stress: .*has {found}"):
        check_stress_cell(model, {}, [structure], "data/x/train")
    backbone.regress_stress = False
    with pytest.raises(DeNSConfigError, match=rf"^outputs\.stress: .*\(data/x/train\) has {found}"):
        check_stress_cell(model, {"energy": {}, "stress": {}}, [structure], "data/x/train")
    check_stress_cell(model, {"energy": {}}, [structure], "data/x/train")  # no stress: fine
    structure.cell = torch.eye(3).unsqueeze(0) * 5.0
    backbone.regress_stress = True
    check_stress_cell(model, {"stress": {}}, [structure], "data/x/train")  # a cell: fine


def test_dens_trainer_follows_fairchems_esen_trainer_conventions():
    """fairchem's eSEN trainer (``mlip_trainer``) differs from the OCP trainer only in
    ``load_extras`` (epochs-to-steps cosine schedule, EMA), which is EquiformerV2's forces
    trainer's line for line; DeNSTrainer builds on the latter, so eSEN configs written for
    ``mlip_trainer`` train with the same schedule. Fails if a fairchem release changes that."""
    overridden = {
        name
        for name, value in vars(MLIPTrainer).items()
        if callable(value) and not name.startswith("__")
    }
    assert overridden == {"load_extras"}

    def body(function):
        return inspect.getsource(function).split("\n", 1)[1]

    assert body(MLIPTrainer.load_extras) == body(EquiformerV2ForcesTrainer.load_extras)
    assert MLIPTrainer.__mro__[1] is EquiformerV2ForcesTrainer.__mro__[1]  # both OCPTrainer
