"""EvalAI-ready outputs from DeNS checkpoints (fairchem_dens.inference), end to end on generated
data: S2EF predictions per split through the stock CLI and fairchem's make_submission_file.py,
IS2RE relaxations and their energy file, predictions that ignore labels, training weights that
survive evaluation, plain <-> DeNS checkpoints, and one-line errors for bad checkpoints and files.
"""

from __future__ import annotations

import copy
import logging
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import ase.io
import fairchem.core
import lmdb
import numpy as np
import pytest
import torch
import yaml
from fairchem.core.common.relaxation.optimizable import OptimizableBatch
from fairchem.core.common.relaxation.optimizers.lbfgs_torch import LBFGS
from fairchem.core.trainers import OCPTrainer
from helpers import (
    DEMO_DIR,
    EQV2_HEADS,
    ESCN_HEADS,
    TINY_EQV2,
    TINY_ESCN,
    run_cli,
    tiny_config,
    trainer_from_config,
    write_config,
)

from fairchem_dens.data.lmdb_io import write_lmdb
from fairchem_dens.inference import RELAXED_ENERGIES_FILE, InferenceError

SUBMISSION_SCRIPT = Path(fairchem.core.__file__).parent / "scripts" / "make_submission_file.py"
OC20_SPLITS = ("id", "ood_ads", "ood_cat", "ood_both")
OC22_SPLITS = ("id", "ood")

#: fairchem 1.10's OptimizableBatch implements ASE < 3.26's Optimizable; with a newer ASE it is
#: an abstract class and fairchem's own run-relaxations fails before any plugin code runs.
RELAX_OK = not OptimizableBatch.__abstractmethods__
needs_relax = pytest.mark.skipif(
    not RELAX_OK,
    reason=f"fairchem 1.10 relaxations need ase<3.26 (installed {ase.__version__}): "
    f"OptimizableBatch is abstract ({sorted(OptimizableBatch.__abstractmethods__)})",
)


# ---- data and config helpers -------------------------------------------------------------------


def read_entries(directory: Path) -> list[Any]:
    """All entries of ``directory/data.lmdb`` (the environment is closed again)."""
    env = lmdb.open(str(directory / "data.lmdb"), subdir=False, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            length = pickle.loads(txn.get(b"length"))
            return [pickle.loads(txn.get(f"{i}".encode("ascii"))) for i in range(length)]
    finally:
        env.close()


def write_copy(directory: Path, entries: list[Any], drop: tuple[str, ...] = (), **add) -> Path:
    """Write ``entries`` without the fields ``drop`` and with the fields ``add`` (lmdb_io)."""
    copies = []
    for entry in entries:
        entry = entry.clone()
        for field in drop:
            if field in entry:
                del entry[field]
        for field, value in add.items():
            entry[field] = value
        copies.append(entry)
    write_lmdb(directory, copies)
    return directory


def s2ef_ids(entries: list[Any]) -> list[str]:
    return [f"{int(e.sid)}_{int(e.fid)}" for e in entries]


def tiny_run(data: Path, variant: str = "oc20", **dens: Any) -> dict[str, Any]:
    """tiny_config that trains 2 steps (8 structures, batch 4) and checkpoints at the end."""
    config = tiny_config(data, variant, **dens)
    config["dataset"]["train"]["train_split_settings"] = {"first_n": 8}
    config["optim"]["scheduler_params"]["warmup_epochs"] = 0.5  # one warm-up step
    config["optim"]["checkpoint_every"] = -1
    config["optim"]["eval_every"] = 2
    return config


def plain_eqv2_config(data: Path) -> dict[str, Any]:
    """The same tiny model for fairchem's own equiformerv2_forces trainer, without DeNS."""
    config = tiny_run(data)
    config["trainer"] = "equiformerv2_forces"
    config["dataset"]["train"]["format"] = "lmdb"
    config["model"]["backbone"] = {"model": "equiformer_v2_backbone", **TINY_EQV2}
    config["model"]["heads"] = copy.deepcopy(EQV2_HEADS)
    del config["optim"]["dens"]
    return config


def train(config: dict[str, Any], run_dir: Path) -> Path:
    with trainer_from_config(config, run_dir) as trainer:
        trainer.train(disable_eval_tqdm=True)
        assert trainer.step == 2
    return next(run_dir.glob("checkpoints/*/checkpoint.pt"))


def predict(trainer: Any, loader: Any) -> dict[str, np.ndarray]:
    torch.manual_seed(0)  # EquiformerV2 and eSCN draw a random vector per edge for its frame
    out = trainer.predict(loader, results_file=None, disable_tqdm=True)
    return {k: np.concatenate(v) if k == "forces" else np.asarray(v) for k, v in out.items()}


def assert_same_predictions(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a["ids"]) == list(b["ids"])
    for name in ("energy", "forces"):
        assert a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def parameters(trainer: Any) -> list[torch.Tensor]:
    """Copies of the model's trainable parameters (the EMA's order)."""
    return [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def make_submission(out: Path, *args: str) -> dict[str, np.ndarray]:
    """Run fairchem's make_submission_file.py (by path, unchanged) and load its output."""
    result = subprocess.run(
        [sys.executable, str(SUBMISSION_SCRIPT), *args, "--out-path", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out, allow_pickle=True) as submission:
        return {k: submission[k] for k in submission.files}


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oc20(emt_data, tmp_path_factory):
    """A DeNS checkpoint trained 2 steps, and the test split cut into four EvalAI splits."""
    root = tmp_path_factory.mktemp("oc20")
    test = read_entries(emt_data / "oc20" / "test")
    splits = {
        name: write_copy(root / "test" / name, test[i :: len(OC20_SPLITS)])
        for i, name in enumerate(OC20_SPLITS)
    }
    config = tiny_run(emt_data, prob=0.5)
    checkpoint = train(config, root / "train")
    return {"root": root, "config": config, "checkpoint": checkpoint, "splits": splits}


def relax_task(steps: int = 3, traj_dir: Path | None = None) -> dict[str, Any]:
    """The ``task`` block of configs/demo/equiformer_v2_dens_relax.yml, fewer steps."""
    relax = yaml.safe_load((DEMO_DIR / "equiformer_v2_dens_relax.yml").read_text())
    task = relax["task"]
    task["relaxation_steps"] = steps
    task["relax_opt"]["traj_dir"] = str(traj_dir) if traj_dir is not None else None
    if traj_dir is None:
        del task["relax_opt"]["traj_dir"]
    return task


# ---- S2EF: predict -> make_submission_file ----------------------------------------------------


@pytest.mark.slow
def test_s2ef_submission_from_dens_checkpoint_through_the_cli(oc20):
    """`fairchem --mode predict` per split, then fairchem's script: EvalAI keys, ids and order."""
    run = oc20["root"] / "predict"
    path = write_config(oc20["config"], oc20["root"] / "predict.yml")
    files = {}
    for split, src in oc20["splits"].items():
        run_cli(
            "--mode",
            "predict",
            "--config-yml",
            str(path),
            "--cpu",
            "--checkpoint",
            str(oc20["checkpoint"]),
            "--run-dir",
            str(run),
            "--timestamp-id",
            split,
            f"--dataset.test.src={src}",
            cwd=oc20["root"],
        )
        files[split] = run / "results" / split / "ocp_predictions.npz"
        assert files[split].is_file()
    flags = [f"--{split.replace('_', '-')}={files[split]}" for split in OC20_SPLITS]
    submission = make_submission(oc20["root"] / "s2ef.npz", *flags)

    expected_keys = {f"{s}_{k}" for s in OC20_SPLITS for k in ("ids", "energy", "forces")}
    expected_keys |= {f"{s}_chunk_idx" for s in OC20_SPLITS}
    assert set(submission) == expected_keys
    for split, src in oc20["splits"].items():
        entries = read_entries(src)
        by_id = dict(zip(s2ef_ids(entries), entries, strict=True))
        ids = list(submission[f"{split}_ids"])
        assert ids == sorted(by_id)  # every structure once, in fairchem's (string) order
        free = [int((by_id[i].fixed == 0).sum()) for i in ids]
        energy, forces = submission[f"{split}_energy"], submission[f"{split}_forces"]
        assert energy.shape[0] == len(ids) and energy.size == len(ids)
        assert forces.shape == (sum(free), 3)  # free atoms only, as EvalAI scores them
        np.testing.assert_array_equal(submission[f"{split}_chunk_idx"], np.cumsum(free)[:-1])
        assert energy.dtype == np.float16 and forces.dtype == np.float16  # fairchem's default
        assert np.isfinite(energy.astype(float)).all() and np.isfinite(forces.astype(float)).all()
        assert np.abs(forces.astype(float)).max() > 0


def test_predictions_do_not_depend_on_labels(emt_data, oc20, tmp_path):
    """The same structures with and without y/force give identical predictions, while DeNS is
    enabled on the training split: prediction takes the plain S2EF path."""
    val = read_entries(emt_data / "oc20" / "val")[:20]
    config = copy.deepcopy(oc20["config"])
    config["dataset"]["val"] = {"src": str(write_copy(tmp_path / "labels", val))}
    unlabelled = write_copy(tmp_path / "no_labels", val, drop=("y", "force"))
    config["dataset"]["test"] = {"src": str(unlabelled)}
    with trainer_from_config(config, tmp_path / "run") as trainer:
        trainer.load_checkpoint(str(oc20["checkpoint"]))
        trainer.enable_dens_on_train_data()
        assert "forces" in trainer.val_dataset[0] and "forces" not in trainer.test_dataset[0]
        labelled = predict(trainer, trainer.val_loader)
        plain = predict(trainer, trainer.test_loader)
    assert_same_predictions(labelled, plain)
    assert sorted(plain["ids"]) == sorted(s2ef_ids(val))


def test_oc22_total_energy_submission_in_float32(emt_data, tmp_path):
    """OC22 (id/ood): predictions include the element references and are written as float32
    (float16 would round total energies), and fairchem's script builds the OC22 file."""
    config = tiny_run(emt_data, "oc22", prob=0.5)
    checkpoint = train(config, tmp_path / "train")
    test = read_entries(emt_data / "oc22" / "test")
    files = {}
    for i, split in enumerate(OC22_SPLITS):
        config["dataset"]["test"] = {"src": str(write_copy(tmp_path / split, test[i::2]))}
        with trainer_from_config(config, tmp_path / f"predict_{split}") as trainer:
            trainer.load_checkpoint(str(checkpoint))
            assert trainer.elementrefs["energy"] is not None
            trainer.predict(trainer.test_loader, results_file="predictions", disable_tqdm=True)
            files[split] = Path(trainer.config["cmd"]["results_dir"]) / "ocp_predictions.npz"
    submission = make_submission(
        tmp_path / "oc22.npz", "--dataset", "OC22", f"--id={files['id']}", f"--ood={files['ood']}"
    )
    assert {k.split("_")[0] for k in submission} == {"id", "ood"}
    for i, split in enumerate(OC22_SPLITS):
        assert list(submission[f"{split}_ids"]) == sorted(s2ef_ids(test[i::2]))
        assert submission[f"{split}_energy"].dtype == np.float32
        assert submission[f"{split}_forces"].shape == (sum(int(e.natoms) for e in test[i::2]), 3)


# ---- IS2RE: run-relaxations -> relaxed_energies.npz -> make_submission_file ------------------


@needs_relax
@pytest.mark.slow
def test_is2re_relaxations_through_the_cli(emt_data, oc20):
    """`fairchem --mode run-relaxations` writes relaxed_energies.npz; fairchem's script turns it
    into the EvalAI IS2RE file (--is2re-relaxations --hybrid), with the energies of the last
    frames of fairchem's own trajectories (its --is2re-relaxations traj mode)."""
    root = oc20["root"] / "relax"
    config = copy.deepcopy(oc20["config"])
    config["dataset"]["relax"] = {"src": str(emt_data / "oc20" / "is2re")}
    config["task"] = relax_task(steps=3, traj_dir=root / "traj")
    # no structure converges early: fairchem's LBFGS stops writing a converged structure's
    # trajectory one step before its final positions, so only then do the two routes agree
    config["task"]["relaxation_fmax"] = 1e-6
    path = write_config(config, oc20["root"] / "relax.yml")
    run_cli(
        "--mode",
        "run-relaxations",
        "--config-yml",
        str(path),
        "--cpu",
        "--checkpoint",
        str(oc20["checkpoint"]),
        "--run-dir",
        str(root),
        "--timestamp-id",
        "relax",
        cwd=oc20["root"],
    )
    results = root / "results" / "relax"
    sids = sorted(str(int(e.sid)) for e in read_entries(emt_data / "oc20" / "is2re"))
    with np.load(results / RELAXED_ENERGIES_FILE) as energies:
        assert list(energies["ids"]) == sids
        assert energies["energy"].shape == (len(sids),) and np.isfinite(energies["energy"]).all()
    with np.load(results / "relaxed_positions.npz") as positions:
        assert list(positions["ids"]) == sids

    energy_file = results / RELAXED_ENERGIES_FILE
    flags = [f"--{s.replace('_', '-')}={energy_file}" for s in OC20_SPLITS]
    hybrid = make_submission(root / "is2re.npz", "--is2re-relaxations", "--hybrid", *flags)
    assert set(hybrid) == {f"{s}_{k}" for s in OC20_SPLITS for k in ("ids", "energy")}
    flags = [f"--{s.replace('_', '-')}={root / 'traj'}" for s in OC20_SPLITS]
    from_traj = make_submission(root / "is2re_traj.npz", "--is2re-relaxations", *flags)
    for split in OC20_SPLITS:
        assert list(hybrid[f"{split}_ids"]) == sids
        traj = dict(zip(from_traj[f"{split}_ids"], from_traj[f"{split}_energy"], strict=True))
        np.testing.assert_allclose(hybrid[f"{split}_energy"], [traj[s] for s in sids], rtol=1e-6)
        # and the relaxation moved the atoms: the last frame is not the initial structure
    first = ase.io.read(root / "traj" / f"{sids[0]}.traj", 0)
    last = ase.io.read(root / "traj" / f"{sids[0]}.traj", -1)
    assert np.abs(last.positions - first.positions).max() > 1e-4


@needs_relax
def test_relaxed_energies_are_the_s2ef_energies_of_the_final_structures(emt_data, tmp_path):
    """OC22: a relaxation of 0 steps reports the S2EF prediction (total energy, element
    references included) of the initial structure, as `predict` writes it."""
    config = tiny_run(emt_data, "oc22", prob=0.5)
    initial = read_entries(emt_data / "oc22" / "is2re")
    config["dataset"]["relax"] = {"src": str(emt_data / "oc22" / "is2re")}
    as_s2ef = write_copy(tmp_path / "s2ef", initial, drop=("y_init", "y_relaxed"), fid=0)
    config["dataset"]["test"] = {"src": str(as_s2ef)}
    config["task"] = relax_task(steps=0)
    with trainer_from_config(config, tmp_path / "run") as trainer:
        trainer.train(disable_eval_tqdm=True)
        trainer.run_relaxations()
        s2ef = predict(trainer, trainer.test_loader)
        results = Path(trainer.config["cmd"]["results_dir"])
    with np.load(results / RELAXED_ENERGIES_FILE) as relaxed:
        energies = dict(zip(s2ef["ids"], s2ef["energy"].ravel(), strict=True))
        assert sorted(energies) == sorted(f"{i}_0" for i in relaxed["ids"])
        assert s2ef["energy"].dtype == np.float32
        expected = [energies[f"{i}_0"] for i in relaxed["ids"]]
        np.testing.assert_allclose(relaxed["energy"], expected, rtol=1e-5)


def test_relax_opt_with_name_is_a_clear_error(emt_data, tmp_path):
    """fairchem 1.10's LBFGS takes no `name`: a config with it stops at start with one line."""
    with pytest.raises(TypeError, match="name"):
        LBFGS(optimizable_batch=None, name="lbfgs")  # the pitfall itself
    config = tiny_run(emt_data)
    config["dataset"]["relax"] = {"src": str(emt_data / "oc20" / "is2re")}
    config["task"] = relax_task()
    config["task"]["relax_opt"]["name"] = "lbfgs"
    with pytest.raises(InferenceError, match=r"task\.relax_opt\.name='lbfgs'") as error:
        with trainer_from_config(config, tmp_path):
            pass
    assert "\n" not in str(error.value)


# ---- training weights survive evaluation -------------------------------------------------------


def test_predict_on_a_batch_leaves_the_training_weights(oc20, tmp_path):
    """fairchem's predict(batch, per_image=False) -- what each relaxation step calls -- leaves
    the EMA weights in the model; ours leaves the weights it found."""
    config = copy.deepcopy(oc20["config"])
    with trainer_from_config(config, tmp_path) as trainer:
        trainer.train(disable_eval_tqdm=True)
        batch = next(iter(trainer.val_loader))
        weights = parameters(trainer)
        assert not same(weights, trainer.ema.shadow_params)  # a swap would show
        trainer.predict(batch, per_image=False, disable_tqdm=True)
        assert same(parameters(trainer), weights)
        OCPTrainer.predict(trainer, batch, per_image=False, disable_tqdm=True)  # control
        assert not same(parameters(trainer), weights)


@needs_relax
def test_training_continues_from_training_weights_after_relaxations(emt_data, oc20, tmp_path):
    """task.eval_relaxations during training: the weights are the same before and after each
    evaluation that runs relaxations (fairchem's own predict would leave the EMA weights)."""
    config = copy.deepcopy(oc20["config"])
    config["optim"]["eval_every"] = 1
    config["dataset"]["relax"] = {"src": str(emt_data / "oc20" / "is2re")}
    config["task"] = {**relax_task(steps=2), "eval_relaxations": True, "relax_dataset": {}}
    snapshots = []
    with trainer_from_config(config, tmp_path) as trainer:
        relax = trainer.run_relaxations

        def recorded() -> None:
            before = parameters(trainer)
            relax()
            shadow = [p.clone() for p in trainer.ema.shadow_params]
            snapshots.append((before, parameters(trainer), shadow))

        trainer.run_relaxations = recorded
        trainer.train(disable_eval_tqdm=True)
    assert len(snapshots) == 2
    for before, after, shadow in snapshots:
        assert same(before, after)
        assert not same(after, shadow)  # the EMA weights differ: a swap would show


# ---- checkpoints: plain <-> DeNS ---------------------------------------------------------------


def test_plain_equiformer_v2_checkpoint_fine_tunes_with_dens(emt_data, oc20, tmp_path, caplog):
    """A checkpoint of fairchem's own equiformerv2_forces trainer loads into the DeNS model:
    the DeNS modules are reported in one line, the predictions are identical before any DeNS
    step, and DeNS training then starts at step 0."""
    plain_config = plain_eqv2_config(emt_data)
    plain_config["dataset"]["test"] = {"src": str(oc20["splits"]["id"])}
    plain_checkpoint = train(plain_config, tmp_path / "plain")
    with trainer_from_config(plain_config, tmp_path / "plain_predict") as trainer:
        trainer.load_checkpoint(str(plain_checkpoint))
        expected = predict(trainer, trainer.test_loader)

    config = copy.deepcopy(oc20["config"])
    config["dataset"]["test"] = {"src": str(oc20["splits"]["id"])}
    with trainer_from_config(config, tmp_path / "dens") as trainer:
        with caplog.at_level(logging.INFO):
            trainer.load_checkpoint(str(plain_checkpoint))
        lines = [r.getMessage() for r in caplog.records if "freshly initialised" in r.getMessage()]
        assert len(lines) == 1
        assert "backbone.force_encoding.*" in lines[0]
        assert "output_heads.dens_noise.*" in lines[0]
        assert str(plain_checkpoint) in lines[0]
        assert_same_predictions(predict(trainer, trainer.test_loader), expected)
        assert trainer.step == 0
        trainer.train(disable_eval_tqdm=True)  # a fresh optimizer over all parameters
        assert trainer.step == 2


def test_dens_checkpoint_runs_in_the_plain_parent_model(oc20, tmp_path, caplog):
    """The DeNS checkpoint in the plain EquiformerV2 (DeNS modules dropped, reported by name)
    predicts exactly what the DeNS model predicts."""
    config = copy.deepcopy(oc20["config"])
    config["dataset"]["test"] = {"src": str(oc20["splits"]["ood_ads"])}
    with trainer_from_config(config, tmp_path / "dens") as trainer:
        trainer.load_checkpoint(str(oc20["checkpoint"]))
        expected = predict(trainer, trainer.test_loader)
    config["model"]["backbone"] = {"model": "equiformer_v2_backbone", **TINY_EQV2}
    config["model"]["heads"] = copy.deepcopy(EQV2_HEADS)
    with trainer_from_config(config, tmp_path / "plain") as trainer:
        with caplog.at_level(logging.INFO):
            trainer.load_checkpoint(str(oc20["checkpoint"]))
        lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert len(lines) == 1
        assert "backbone.force_encoding.*" in lines[0] and "output_heads.dens_noise.*" in lines[0]
        assert_same_predictions(predict(trainer, trainer.test_loader), expected)


def test_plain_escn_checkpoint_loads_into_the_dens_escn(oc20, tmp_path, caplog):
    """The same for eSCN: fairchem's eSCN checkpoint in DeNSeSCNBackbone + eSCNNoiseHead."""
    escn = dict(TINY_ESCN, num_sphere_samples=128)
    config = copy.deepcopy(oc20["config"])
    config["dataset"]["test"] = {"src": str(oc20["splits"]["ood_cat"])}
    config["dataset"]["test"]["test_split_settings"] = {"first_n": 6}
    config["model"]["backbone"] = {"model": "escn_backbone", **escn}
    config["model"]["heads"] = copy.deepcopy(ESCN_HEADS)
    dens = config["optim"].pop("dens")  # the plain model trains without DeNS
    with trainer_from_config(config, tmp_path / "plain") as trainer:
        trainer.train(disable_eval_tqdm=True)
        expected = predict(trainer, trainer.test_loader)
    config["optim"]["dens"] = dens
    checkpoint = next((tmp_path / "plain").glob("checkpoints/*/checkpoint.pt"))
    config["model"]["backbone"]["model"] = "fairchem_dens.models.escn.DeNSeSCNBackbone"
    config["model"]["heads"]["dens_noise"] = {"module": "fairchem_dens.heads.eSCNNoiseHead"}
    with trainer_from_config(config, tmp_path / "dens") as trainer:
        with caplog.at_level(logging.INFO):
            trainer.load_checkpoint(str(checkpoint))
        assert "output_heads.dens_noise.*" in caplog.text
        assert "backbone.force_encoding.*" in caplog.text
        assert_same_predictions(predict(trainer, trainer.test_loader), expected)


def named_ema(trainer: Any) -> dict[str, torch.Tensor]:
    """The trainer's EMA weights by parameter name (the EMA list follows the parameters)."""
    names = [
        n.removeprefix("module.") for n, p in trainer.model.named_parameters() if p.requires_grad
    ]
    return dict(zip(names, trainer.ema.shadow_params, strict=True))


def named_weights(trainer: Any) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in trainer.model.state_dict().items()}


def test_ddp_saved_and_plain_saved_checkpoints_both_load_with_ema(oc20, tmp_path):
    """The CLI saves the DDP-wrapped model (``module.`` keys); a checkpoint saved from the bare
    model has none. Both load by name into the (DDP-wrapped) trainer with the same weights,
    EMA and trainer state."""
    checkpoint = torch.load(oc20["checkpoint"], weights_only=False)
    assert all(k.startswith("module.") for k in checkpoint["state_dict"])  # DDP-saved
    plain = {
        **checkpoint,
        "state_dict": {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()},
    }
    torch.save(plain, tmp_path / "plain.pt")
    loaded = []
    for path in (oc20["checkpoint"], tmp_path / "plain.pt"):
        with trainer_from_config(copy.deepcopy(oc20["config"]), tmp_path / path.stem) as trainer:
            assert trainer.model is not trainer._unwrapped_model
            trainer.load_checkpoint(str(path))
            loaded.append((named_weights(trainer), named_ema(trainer), trainer.step))
    (weights, ema, step), (plain_weights, plain_ema, plain_step) = loaded
    assert step == plain_step == 2  # the very run: its trainer state loads
    assert weights.keys() == plain_weights.keys()
    assert all(torch.equal(weights[k], plain_weights[k]) for k in weights)
    assert all(torch.equal(ema[k], plain_ema[k]) for k in ema)
    saved = {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}
    assert all(torch.equal(weights[k], saved[k]) for k in saved)
    assert not all(torch.equal(ema[k], weights[k]) for k in ema)  # a real EMA, not the weights


def test_checkpoint_into_a_model_with_an_added_head_matches_ema_by_name(oc20, tmp_path):
    """Fine-tuning with one more head (``strict_load: false``, as fairchem's e2e test loads a
    checkpoint into a model with an added head): the new head sorts first, so every parameter
    moves by position; each weight and EMA entry still lands on the parameter of its name, the
    new head starts (and its EMA starts) from its fresh weights, the trainer state restored by
    position is not loaded, and EMA predictions run."""
    with trainer_from_config(copy.deepcopy(oc20["config"]), tmp_path / "same") as trainer:
        trainer.load_checkpoint(str(oc20["checkpoint"]))
        expected_ema, expected_weights = named_ema(trainer), named_weights(trainer)
    config = copy.deepcopy(oc20["config"])
    config["task"] = {**config.get("task", {}), "strict_load": False}
    config["model"]["heads"]["aux_energy"] = {  # sorts before the others (HydraModel sorts)
        "module": "equiformerV2_scalar_head",
        "output_name": "aux_energy",
    }
    config["dataset"]["test"] = {"src": str(oc20["splits"]["id"])}
    with trainer_from_config(config, tmp_path / "added") as trainer:
        fresh = {n: p.detach().clone() for n, p in named_ema(trainer).items() if "aux" in n}
        heads = [name for name in named_ema(trainer) if name.startswith("output_heads.")]
        assert fresh and heads[0].startswith("output_heads.aux_energy.")
        trainer.load_checkpoint(str(oc20["checkpoint"]))
        ema, weights = named_ema(trainer), named_weights(trainer)
        assert trainer.step == 0  # fine-tuning from the weights, not the very run
        predict(trainer, trainer.test_loader)  # the EMA weights are copied in and out
    for name, value in expected_ema.items():
        assert torch.equal(ema[name], value), name
    for name, value in expected_weights.items():
        assert torch.equal(weights[name], value), name
    for name, value in fresh.items():
        assert torch.equal(weights[name], value) and torch.equal(ema[name], value), name


# ---- bad input: one line naming the file -------------------------------------------------------


def schnet_checkpoint(path: Path) -> Path:
    """A checkpoint holding the state dict of fairchem's SchNet (another architecture)."""
    from fairchem.core.common.registry import registry

    model = registry.get_model_class("schnet")(hidden_channels=8, num_filters=8, num_interactions=1)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "normalizers": {},
            "config": {"model": {"name": "schnet"}},
        },
        path,
    )
    return path


def wrong_shape_checkpoint(source: Path, path: Path) -> Path:
    checkpoint = torch.load(source, weights_only=False)
    key = next(k for k in checkpoint["state_dict"] if k.endswith("sphere_embedding.weight"))
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key][:, :4]
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda ck, p: schnet_checkpoint(p), r"checkpoint of another model \(checkpoint: schnet"),
        (wrong_shape_checkpoint, r"'backbone\.sphere_embedding\.weight' is \(90, 4\)"),
        (lambda ck, p: p.write_text("not a checkpoint") and p, r"cannot be read as a PyTorch"),
    ],
    ids=["schnet", "tensor-shape", "not-a-checkpoint"],
)
def test_bad_checkpoint_is_one_line_naming_the_file(oc20, tmp_path, make, message):
    bad = make(oc20["checkpoint"], tmp_path / "bad.pt")
    with trainer_from_config(copy.deepcopy(oc20["config"]), tmp_path / "run") as trainer:
        with pytest.raises(InferenceError, match=message) as error:
            trainer.load_checkpoint(str(bad))
    assert str(error.value).startswith(f"{bad}: ")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("variant", "missing"),
    [("oc20", "sid"), ("oc20", "fid"), ("oc22", "sid")],
)
def test_test_lmdb_without_ids_is_one_line_naming_the_file(emt_data, tmp_path, variant, missing):
    entries = read_entries(emt_data / variant / "test")[:4]
    bad = write_copy(tmp_path / "test", entries, drop=(missing,))
    config = tiny_run(emt_data, variant)
    config["dataset"]["test"] = {"src": str(bad)}
    with pytest.raises(InferenceError, match=rf"entry 0 has no '{missing}' field") as error:
        with trainer_from_config(config, tmp_path / "run"):
            pass
    assert str(error.value).startswith(f"{bad / 'data.lmdb'}: ")
    assert "\n" not in str(error.value)
