"""The DeNS trainer (Alg. 1 l.28-40): per-structure loss terms, one collective per step, no
corruption outside the training split, logging, and clear errors for bad settings."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from fairchem.core.common import distutils
from fairchem.core.trainers import OCPTrainer
from helpers import tiny_config, trainer_from_config
from torch_geometric.data import Batch

from fairchem_dens import keys
from fairchem_dens.config import DeNSConfigError
from fairchem_dens.noise import Status


def first_batch(trainer):
    trainer.enable_dens_on_train_data()
    trainer.train_sampler.set_epoch_and_start_iteration(0, 0)
    return next(iter(trainer.train_loader))


def optimal_outputs(trainer, batch):
    """Predictions equal to the normalised targets (the exact optimum of Alg. 1); the noise
    prediction is a model output like energy and forces."""
    out = {}
    for name in ("energy", "forces"):
        target = batch[name].view(batch[name].shape[0], -1).clone()
        if name in trainer.elementrefs:
            target = trainer.elementrefs[name].dereference(target, batch)
        out[name] = trainer.normalizers[name].norm(target).requires_grad_()
    out[keys.NOISE_OUTPUT] = batch[keys.DENS_TARGET].clone().requires_grad_()
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
        moved[keys.NOISE_OUTPUT if name == "noise" else name][rows] += delta
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


def test_missing_noise_head_stops_training_with_one_line(emt_data, tmp_path):
    """Training with optim.dens needs the noise head (a plain model may still validate and
    predict with the same config)."""
    config = tiny_config(emt_data)
    del config["model"]["heads"]["dens_noise"]
    with trainer_from_config(config, tmp_path) as trainer:
        with pytest.raises(
            DeNSConfigError, match=r"^model\.heads: optim\.dens needs a DeNS"
        ) as error:
            trainer.train(disable_eval_tqdm=True)
        assert trainer.step == 0
    assert "\n" not in str(error.value)


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


# ---- the loss value against Alg. 1 by hand (issue 14 item 5) ------------------------------------


def hand_batch(trainer, sigma: float = 0.2, seed: int = 0) -> Batch:
    """Two training structures: the first keeps the original task, the second is a DeNS
    structure with r_DeNS < 1 (half of its free atoms corrupted); both have fixed atoms."""
    generator = torch.Generator().manual_seed(seed)
    structures = []
    for index, is_dens in ((0, False), (1, True)):
        data = trainer.train_dataset[index].clone()  # not enabled: an uncorrupted structure
        n = data.pos.shape[0]
        free = data.fixed == 0
        mask = torch.zeros(n, dtype=torch.bool)
        if is_dens:
            free_atoms = free.nonzero().view(-1)
            mask[free_atoms[: len(free_atoms) // 2]] = True  # r_DeNS < 1
        noise = torch.randn(n, 3, generator=generator) * sigma * mask[:, None]
        data[keys.DENS_MASK] = mask
        data[keys.DENS_STRUCTURE] = torch.tensor([is_dens])
        data[keys.DENS_SIGMA] = torch.tensor([sigma if is_dens else 0.0])
        data[keys.DENS_STATUS] = torch.tensor([int(Status.DENS if is_dens else Status.ORIGINAL)])
        data[keys.DENS_TARGET] = noise / sigma  # Eq. 4 target ε/σ
        data[keys.DENS_FORCE_INPUT] = data.forces * mask[:, None]
        structures.append(data)
    return Batch.from_data_list(structures)


def random_outputs(batch, seed: int = 1, noise: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    n, b = batch.pos.shape[0], batch.natoms.numel()
    out = {
        "energy": torch.randn(b, 1, generator=generator),
        "forces": torch.randn(n, 3, generator=generator),
    }
    if noise:
        out[keys.NOISE_OUTPUT] = torch.randn(n, 3, generator=generator)
    return {name: value.requires_grad_() for name, value in out.items()}


def with_reduction(config, reduction: str):
    for entry in config["loss_functions"]:
        for spec in entry.values():
            spec["reduction"] = reduction
    return config


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_value_is_alg1_computed_by_hand(emt_data, tmp_path, reduction):
    """λ_E·L_E + λ_F·L_F + λ_DeNS·L_DeNS of a mixed batch (trainer.py's module docstring: B
    structures, N = free ∪ corrupted atoms shared by L_F and L_DeNS), from the paper's
    formulas in plain torch (Eq. 1, Eq. 4, Eq. 6, Alg. 1 l.30-40); ``sum`` drops B and N."""
    config = with_reduction(tiny_config(emt_data, coefficient=7.0), reduction)
    with trainer_from_config(config, tmp_path) as trainer:
        batch = hand_batch(trainer)
        out = random_outputs(batch)
        loss = trainer._compute_loss(out, batch).item()

        mask, free = batch[keys.DENS_MASK], batch.fixed == 0
        assert mask.any() and (free & ~mask).any() and (~free).any()
        assert batch[keys.DENS_STRUCTURE].tolist() == [False, True]
        assert (mask.sum() < free[batch.batch == 1].sum()).item()  # r_DeNS < 1
        assert "energy" not in trainer.elementrefs
        coefficient = {name: info["coefficient"] for name, info in trainer.loss_functions}
        energy_norm, force_norm = trainer.normalizers["energy"], trainer.normalizers["forces"]
        d = torch.float64
        # Eq. 1 / Eq. 6 targets: normalised energy E' and forces f'
        energy_target = (batch.energy.to(d) - float(energy_norm.mean)) / float(energy_norm.rmsd)
        force_target = (batch.forces.to(d) - float(force_norm.mean)) / float(force_norm.rmsd)
        energy_error = (out["energy"].detach().to(d).view(-1) - energy_target.view(-1)).abs()
        force_error = (out["forces"].detach().to(d) - force_target).norm(dim=-1)  # l2mae
        noise_error = (  # Eq. 4: |ε̂ - ε/σ|
            out[keys.NOISE_OUTPUT].detach().to(d) - batch[keys.DENS_TARGET].to(d)
        ).norm(dim=-1)
        loss_energy = energy_error.sum()  # both structures (energy_on_dens, Eq. 6)
        loss_forces = force_error[free & ~mask].sum()  # Alg. 1 l.31: uncorrupted free atoms
        loss_dens = noise_error[mask].sum()  # Alg. 1 l.30: corrupted atoms
        if reduction == "mean":
            structures, atoms = batch.natoms.numel(), (free | mask).sum().item()
            loss_energy, loss_forces, loss_dens = (
                loss_energy / structures,
                loss_forces / atoms,
                loss_dens / atoms,
            )
        expected = (
            coefficient["energy"] * loss_energy
            + coefficient["forces"] * loss_forces
            + 7.0 * loss_dens
        ).item()
        assert loss == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batch_without_a_drawn_structure_is_fairchems_loss(emt_data, tmp_path, reduction):
    """DeNS fields but nothing drawn (p_DeNS = 0): exactly fairchem's OCPTrainer._compute_loss
    (its DDPLoss with the entry's reduction), the noise is not declared and L_DeNS is 0."""
    config = with_reduction(tiny_config(emt_data, prob=0.0), reduction)
    with trainer_from_config(config, tmp_path) as trainer:
        batch = first_batch(trainer)
        assert keys.DENS_MASK in batch and not batch[keys.DENS_MASK].any()
        with torch.no_grad():
            assert keys.NOISE_OUTPUT not in trainer._forward(batch)
        out = random_outputs(batch, noise=False)
        ours = trainer._compute_loss(out, batch)
        fairchems = OCPTrainer._compute_loss(trainer, out, batch)
        assert ours.item() == pytest.approx(fairchems.item(), rel=1e-6)
        assert trainer._dens_log["loss_dens"] == 0.0


def test_non_finite_prediction_is_guarded_as_fairchems_ddploss(emt_data, tmp_path, caplog):
    """A NaN prediction is logged and set to 0 (fairchem's DDPLoss): the loss stays finite and
    equals the loss of the prediction with that row at 0 (on every term, the noise included)."""
    with trainer_from_config(tiny_config(emt_data), tmp_path) as trainer:
        batch = hand_batch(trainer)
        out = random_outputs(batch)
        zeroed = {name: value.detach().clone() for name, value in out.items()}
        corrupted = batch[keys.DENS_MASK].nonzero()[0]
        for name, row in (("forces", 0), ("energy", 1), (keys.NOISE_OUTPUT, corrupted)):
            out[name].data[row] = float("nan")
            zeroed[name][row] = 0.0
        with caplog.at_level(logging.WARNING):
            loss = trainer._compute_loss(out, batch)
        assert torch.isfinite(loss)
        assert "Found nans while computing loss" in caplog.text
        assert loss.item() == pytest.approx(trainer._compute_loss(zeroed, batch).item())
        # the same guard as fairchem on a batch without a drawn structure
        batch[keys.DENS_MASK][:] = False
        batch[keys.DENS_STRUCTURE][:] = False
        plain = {name: out[name] for name in ("energy", "forces")}
        fairchems = OCPTrainer._compute_loss(trainer, plain, batch)
        assert trainer._compute_loss(plain, batch).item() == pytest.approx(fairchems.item())


def test_noise_rows_of_uncorrupted_atoms_are_never_read(emt_data, tmp_path, caplog):
    """The noise head may skip uncorrupted atoms (their rows are unspecified): whatever they
    hold, NaN included, the loss and its gradients are unchanged and nothing is logged."""
    with trainer_from_config(tiny_config(emt_data), tmp_path) as trainer:
        batch = hand_batch(trainer)
        out = random_outputs(batch)
        reference = trainer._compute_loss(out, batch).item()
        uncorrupted = ~batch[keys.DENS_MASK]
        out[keys.NOISE_OUTPUT].data[uncorrupted] = float("nan")
        with caplog.at_level(logging.WARNING):
            loss = trainer._compute_loss(out, batch)
        loss.backward()
        assert loss.item() == pytest.approx(reference, rel=1e-6)
        assert "Found nans" not in caplog.text
        assert torch.isfinite(out[keys.NOISE_OUTPUT].grad).all()


def test_unknown_reduction_is_one_line(emt_data, tmp_path):
    config = with_reduction(tiny_config(emt_data), "per_structure")
    with pytest.raises(
        DeNSConfigError, match=r"^loss_functions\.energy\.reduction='per_structure'"
    ):
        with trainer_from_config(config, tmp_path):
            pass


def test_encoded_forces_are_divided_by_the_forces_normalisers_rmsd(emt_data, tmp_path):
    """Alg. 1 l.24: f̃' = f/σ_F with σ_F the FORCES normaliser (here ≠ the energy's)."""
    config = tiny_config(emt_data, prob=1.0)
    normalizer = config["dataset"]["train"]["transforms"]["normalizer"]
    normalizer["energy"] = {"mean": 0.5, "rmsd": 3.0}
    normalizer["forces"] = {"mean": 0.0, "rmsd": 0.25}
    with trainer_from_config(config, tmp_path) as trainer:
        batch = first_batch(trainer)
        mask = batch[keys.DENS_MASK]
        assert mask.any()
        expected = batch.forces / 0.25 * mask[:, None]
        assert torch.allclose(batch[keys.DENS_FORCE_INPUT], expected, rtol=1e-6, atol=0)


# ---- metrics, windows, data files ---------------------------------------------------------------


def test_training_metrics_of_a_mixed_batch_equal_the_per_structure_result(trainer, monkeypatch):
    """Metrics on the original-task structures by masks equal fairchem's metrics on a batch
    rebuilt from those structures (the old way), and no Batch is rebuilt per step."""
    batch = first_batch(trainer)
    is_dens = batch[keys.DENS_STRUCTURE]
    assert is_dens.any() and (~is_dens).any()
    with torch.no_grad():
        out = trainer._forward(batch)
        trainer._compute_loss(out, batch)  # fills the logged DeNS terms
    original = (~is_dens).nonzero().view(-1)
    atoms = ~is_dens[batch.batch]
    level = {name: trainer.output_targets[name]["level"] for name in ("energy", "forces")}
    sub_out = {n: out[n][atoms] if level[n] == "atom" else out[n][original] for n in level}
    sub_batch = Batch.from_data_list(batch.index_select(original))
    expected = OCPTrainer._compute_metrics(trainer, sub_out, sub_batch, trainer.evaluator, {})

    def no_rebuild(*args, **kwargs):
        raise AssertionError("Batch.from_data_list called while computing training metrics")

    monkeypatch.setattr(Batch, "from_data_list", no_rebuild)
    metrics = trainer._compute_metrics(out, batch, trainer.evaluator, {})
    for name, value in expected.items():
        assert metrics[name]["numel"] == value["numel"], name
        assert metrics[name]["total"] == pytest.approx(value["total"], rel=1e-6), name
    assert metrics["loss_dens"]["metric"] == pytest.approx(trainer._dens_log["loss_dens"])


def test_fractional_epoch_window_is_refused_with_one_line(emt_data, tmp_path):
    config = tiny_config(emt_data, epochs=[0, 0.5])
    with pytest.raises(
        DeNSConfigError, match=r"^optim\.dens\.epochs=\[0, 0\.5\]: bounds must be"
    ) as error:
        with trainer_from_config(config, tmp_path):
            pass
    assert "\n" not in str(error.value)


def test_missing_metadata_with_atom_balancing_is_one_line(emt_data, tmp_path):
    """``load_balancing: atoms`` without metadata.npz (official LMDBs ship without it) stops at
    start naming the file and fairchem's command that writes it."""
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(emt_data / "oc20" / "train" / "data.lmdb", bare / "data.lmdb")
    config = tiny_config(emt_data)
    config["dataset"]["train"]["src"] = str(bare)
    config["optim"]["load_balancing"] = "atoms"
    with pytest.raises(DeNSConfigError) as error:
        with trainer_from_config(config, tmp_path / "run"):
            pass
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"optim.load_balancing='atoms': needs {bare / 'metadata.npz'}")
    assert f"python -m fairchem.core.scripts.make_lmdb_sizes --data-path {bare}" in message


def test_batch_with_dens_fields_and_nothing_corrupted_trains_under_ddp(emt_data, tmp_path):
    """p_DeNS = 0: every batch carries DeNS fields and no corrupted atom; the noise head's
    output is not declared, L_DeNS is exactly 0 and the DDP-wrapped model trains."""
    config = tiny_config(emt_data, prob=0.0)
    config["dataset"]["train"]["train_split_settings"] = {"first_n": 8}
    config["optim"]["scheduler_params"]["warmup_epochs"] = 0.5
    with trainer_from_config(config, tmp_path) as trainer:
        assert trainer.model is not trainer._unwrapped_model
        logs = []
        log_terms = trainer._log_dens_terms
        trainer._log_dens_terms = lambda terms, batch: logs.append(terms) or log_terms(terms, batch)
        trainer.train(disable_eval_tqdm=True)
        assert trainer.step == 2 and len(logs) == 2
        assert all(terms["dens"][1].item() == 0.0 for terms in logs)
