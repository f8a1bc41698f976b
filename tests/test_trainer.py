"""The DeNS trainer (Alg. 1 l.28-40): per-structure loss terms, one collective per step, no
corruption outside the training split, logging, and clear errors for bad settings."""

from __future__ import annotations

import pytest
import torch
from fairchem.core.common import distutils
from helpers import tiny_config, trainer_from_config

from fairchem_dens import keys
from fairchem_dens.config import DeNSConfigError


def first_batch(trainer):
    trainer.enable_dens_on_train_data()
    trainer.train_sampler.set_epoch_and_start_iteration(0, 0)
    return next(iter(trainer.train_loader))


def optimal_outputs(trainer, batch):
    """Predictions equal to the normalised targets (the exact optimum of Alg. 1)."""
    out = {}
    for name in ("energy", "forces"):
        target = batch[name].view(batch[name].shape[0], -1).clone()
        if name in trainer.elementrefs:
            target = trainer.elementrefs[name].dereference(target, batch)
        out[name] = trainer.normalizers[name].norm(target).requires_grad_()
    trainer._model_output = {keys.NOISE_OUTPUT: batch[keys.DENS_TARGET].clone().requires_grad_()}
    return out


@pytest.fixture
def trainer(emt_data, tmp_path):
    config = tiny_config(emt_data, prob=0.5, sigma_high=0.5, coefficient=10.0)
    with trainer_from_config(config, tmp_path) as trainer:
        yield trainer


def test_loss_is_zero_at_the_optimum_and_each_term_reads_only_its_atoms(trainer):
    batch = first_batch(trainer)
    mask, fixed = batch[keys.DENS_MASK], batch.fixed.bool()
    assert mask.any() and (~mask & ~fixed).any() and fixed.any()
    out = optimal_outputs(trainer, batch)
    assert trainer._compute_loss(out, batch).item() == pytest.approx(0.0, abs=1e-6)

    def loss_with(name, rows, delta=1.0):
        moved = {k: v.detach().clone() for k, v in out.items()}
        noise = trainer._model_output[keys.NOISE_OUTPUT].detach().clone()
        target = noise if name == "noise" else moved[name]
        target[rows] += delta
        trainer._model_output = {keys.NOISE_OUTPUT: noise}
        return trainer._compute_loss(moved, batch).item()

    corrupted = mask.nonzero()[0]
    uncorrupted_free = (~mask & ~fixed).nonzero()[0]
    fixed_atom = fixed.nonzero()[0]
    assert loss_with("forces", corrupted) == pytest.approx(0.0, abs=1e-6)  # Alg. 1 l.31
    assert loss_with("forces", fixed_atom) == pytest.approx(0.0, abs=1e-6)  # free atoms only
    assert loss_with("forces", uncorrupted_free) > 0
    assert loss_with("noise", uncorrupted_free) == pytest.approx(0.0, abs=1e-6)  # m_i = 0
    assert loss_with("noise", corrupted) > 0  # Eq. 4
    dens_structure = batch[keys.DENS_STRUCTURE].nonzero()[0]
    assert loss_with("energy", dens_structure) > 0  # Eq. 6: energy of the original structure


def test_energy_off_on_dens_structures(emt_data, tmp_path):
    config = tiny_config(emt_data, prob=0.5, energy_on_dens=False)  # Table 1e idx 3
    with trainer_from_config(config, tmp_path) as trainer:
        batch = first_batch(trainer)
        out = optimal_outputs(trainer, batch)
        is_dens = batch[keys.DENS_STRUCTURE]
        assert is_dens.any() and (~is_dens).any()
        for rows, changes in ((is_dens, False), (~is_dens, True)):
            moved = {k: v.detach().clone() for k, v in out.items()}
            moved["energy"][rows] += 1.0
            loss = trainer._compute_loss(moved, batch).item()
            assert (loss > 1e-6) == changes


def test_one_collective_per_step_whatever_was_drawn(emt_data, tmp_path, monkeypatch):
    calls = []
    original = distutils.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(distutils, "all_reduce", counting)
    for prob in (0.0, 1.0):
        config = tiny_config(emt_data, prob=prob)
        with trainer_from_config(config, tmp_path / str(prob)) as trainer:
            batch = first_batch(trainer)
            assert batch[keys.DENS_STRUCTURE].any() == (prob == 1.0)
            out = optimal_outputs(trainer, batch)
            calls.clear()
            trainer._compute_loss(out, batch)
            assert len(calls) == 1


def test_validation_and_test_data_are_never_corrupted(emt_data, tmp_path):
    config = tiny_config(emt_data, prob=1.0)
    config["dataset"]["test"] = {"src": str(emt_data / "oc20" / "test")}
    with trainer_from_config(config, tmp_path) as trainer:
        trainer.enable_dens_on_train_data()
        # fairchem copies the train settings (our DeNS dataset format included) into val and test
        assert trainer.config["val_dataset"].get("use_train_settings", True)
        assert type(trainer.val_dataset.dataset) is type(trainer.train_dataset.dataset)
        assert keys.DENS_MASK in trainer.train_dataset[0]
        for loader in (trainer.val_loader, trainer.test_loader):
            for batch in loader:
                assert not any(k in batch for k in keys.ALL_FIELDS)


def test_training_logs_the_three_terms_and_fractions(trainer, monkeypatch):
    logged = []
    monkeypatch.setattr(trainer.logger, "log", lambda d, step=None, split="": logged.append(d))
    trainer.config["optim"]["max_epochs"] = 1
    trainer.train(disable_eval_tqdm=True)
    train_logs = [d for d in logged if "loss_dens" in d]
    assert len(train_logs) == len(trainer.train_loader)
    for name in ("energy", "forces", "dens"):
        assert all(f"loss_{name}" in d and f"loss_{name}_weighted" in d for d in train_logs)
    fractions = [d["dens_structure_fraction"] for d in train_logs]
    assert 0 < sum(fractions) / len(fractions) < 1
    weighted = train_logs[-1]["loss_dens_weighted"] / train_logs[-1]["loss_dens"]
    assert weighted == pytest.approx(10.0)


def test_linear_decay_of_dens_coefficient(emt_data, tmp_path):
    config = tiny_config(emt_data, schedule="linear", coefficient=10.0)
    with trainer_from_config(config, tmp_path) as trainer:
        total = len(trainer.train_loader)
        trainer.step = 0
        assert trainer.dens_coefficient() == pytest.approx(10.0)
        trainer.step = total // 2
        assert trainer.dens_coefficient() == pytest.approx(10.0 * (1 - (total // 2) / total))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["optim"]["dens"].update(prob=2.0), r"optim\.dens\.prob=2\.0: must be in"),
        (
            lambda c: c["dataset"]["train"].update(format="lmdb"),
            r"dataset\.train\.format='lmdb': optim\.dens needs a DeNS dataset",
        ),
        (
            lambda c: c["optim"]["scheduler_params"].update(warmup_epochs=0.001),
            r"warmup_epochs=0\.001: rounds to 0 warm-up steps",
        ),
    ],
)
def test_bad_settings_stop_with_one_line(emt_data, tmp_path, change, message):
    config = tiny_config(emt_data)
    change(config)
    with pytest.raises(DeNSConfigError, match=message) as error:
        with trainer_from_config(config, tmp_path):
            pass
    assert "\n" not in str(error.value)


def test_missing_noise_head_is_a_clear_error(emt_data, tmp_path):
    config = tiny_config(emt_data)
    del config["model"]["heads"]["dens_noise"]
    with trainer_from_config(config, tmp_path) as trainer:
        batch = first_batch(trainer)
        with torch.no_grad():
            out = trainer._forward(batch)
        with pytest.raises(DeNSConfigError, match=r"model\.heads: no head outputs 'dens_noise'"):
            trainer._compute_loss(out, batch)


def test_epoch_window_and_ddp_without_dens_modules(emt_data, tmp_path, monkeypatch):
    """Outside `epochs` no structure carries DeNS fields, the DeNS modules do not run, and the
    DDP-wrapped model (the CLI wraps even one rank) still trains."""
    config = tiny_config(emt_data, prob=1.0, epochs=[0, 1])
    config["dataset"]["train"]["train_split_settings"] = {"first_n": 16}
    config["optim"]["max_epochs"] = 2
    config["optim"]["scheduler_params"]["warmup_epochs"] = 0.5
    with trainer_from_config(config, tmp_path) as trainer:
        assert trainer.model is not trainer._unwrapped_model  # DistributedDataParallel
        dens_steps = []
        log_terms = trainer._log_dens_terms
        monkeypatch.setattr(
            trainer,
            "_log_dens_terms",
            lambda terms, batch: dens_steps.append(trainer.epoch) or log_terms(terms, batch),
        )
        trainer.train(disable_eval_tqdm=True)
        assert trainer.step == 2 * len(trainer.train_loader)
    assert len(dens_steps) == len(trainer.train_loader)  # every step of epoch 0, none after
    assert all(epoch <= 1.0 for epoch in dens_steps)


def test_noise_head_never_runs_in_validation_or_predict(trainer):
    calls = []
    head = trainer._unwrapped_model.output_heads["dens_noise"]
    head.force_block.register_forward_hook(lambda *args: calls.append(1))
    trainer.enable_dens_on_train_data()
    trainer.validate(split="val", disable_tqdm=True)
    trainer.predict(trainer.val_loader, results_file=None, disable_tqdm=True)
    assert calls == []
    batch = first_batch(trainer)
    trainer._forward(batch)
    assert calls == [1]  # the hook is live: training batches do run the head


@pytest.mark.parametrize(
    ("path", "key"),
    [
        (("optim", "max_epochs"), "optim.max_epochs"),
        (("optim", "lr_initial"), "optim.lr_initial"),
        (("optim", "scheduler_params", "lr_min_factor"), "optim.scheduler_params.lr_min_factor"),
        (("model", "backbone", "model"), "model.backbone.model"),
        (("loss_functions",), "loss_functions"),
    ],
)
def test_missing_required_key_is_one_line(emt_data, tmp_path, path, key):
    config = tiny_config(emt_data)
    parent = config
    for name in path[:-1]:
        parent = parent[name]
    del parent[path[-1]]
    with pytest.raises(DeNSConfigError, match=rf"^{key}: required key is missing"):
        with trainer_from_config(config, tmp_path):
            pass


def test_dens_disabled_with_dens_model_trains_under_ddp(emt_data, tmp_path):
    """`optim.dens.enabled: false` with the DeNS model still trains (DDP sees every parameter)."""
    config = tiny_config(emt_data, enabled=False)
    config["dataset"]["train"]["train_split_settings"] = {"first_n": 12}
    config["optim"]["scheduler_params"]["warmup_epochs"] = 0.5
    with trainer_from_config(config, tmp_path) as trainer:
        assert trainer.dens is None and trainer.model is not trainer._unwrapped_model
        trainer.train(disable_eval_tqdm=True)
        assert trainer.step == len(trainer.train_loader) >= 2
