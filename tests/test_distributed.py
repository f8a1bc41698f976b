"""DeNS on two CPU ranks (gloo), launched as users launch it (``python -m fairchem_dens.launch``,
which runs fairchem's own Runner): each rank corrupts its own, disjoint structures with the draws a
one-rank run makes for the same (structure, epoch); the loss is one global mean over both ranks
with one collective per step, also when one rank draws DeNS for every structure and the other for
none.

The runs use the recording classes below (named by dotted path in the YAML, so fairchem's registry
imports this module in every rank): they record, per rank and step, what the trainer saw.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from fairchem.core.common import distutils
from helpers import tiny_config, trainer_from_config, write_config
from torch_geometric.data import Batch

from fairchem_dens import keys
from fairchem_dens.datasets import DeNSLmdbDataset
from fairchem_dens.noise import Status
from fairchem_dens.trainer import DeNSTrainer

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "barrier", "reduce", "all_gather_object")

#: Environment of the recording classes (set by the tests for the launched processes).
RECORD_DIR = "DENS_TEST_RECORD_DIR"
PAUSE_AT_STEP = "DENS_TEST_PAUSE_AT_STEP"
PAUSE_MARKER = "DENS_TEST_PAUSE_MARKER"
RESTORE_RNG = "DENS_TEST_RESTORE_RNG"


# ---- recording classes (imported by the launched ranks) ---------------------------------------


class IndexedDeNSLmdbDataset(DeNSLmdbDataset):
    """The DeNS dataset, plus each structure's dataset index (the ``index`` of
    ``noise.structure_rng``) as the field ``sample_number`` (PyG's collation would offset a field
    whose name contains "index")."""

    def __getitem__(self, idx: int) -> Any:
        data = super().__getitem__(idx)
        data.sample_number = torch.tensor([int(idx)])
        return data


class SkewedDeNSLmdbDataset(IndexedDeNSLmdbDataset):
    """Rank 0 draws DeNS for every structure (p_DeNS = 1), every other rank for none (p = 0)."""

    def _dens_corrupt(self, data: Any, idx: int) -> Any:
        original = self._dens
        self._dens = dataclasses.replace(original, prob=1.0 if distutils.get_rank() == 0 else 0.0)
        try:
            return super()._dens_corrupt(data, idx)
        finally:
            self._dens = original


class RecordingTrainer(DeNSTrainer):
    """The DeNS trainer, recording per step what it saw into ``$DENS_TEST_RECORD_DIR``:
    ``record_rank{r}_pid{p}.pt`` (a list, one dict per step, rewritten every step),
    ``initial_rank{r}.pt`` and ``final_rank{r}.pt`` (model weights). With
    ``$DENS_TEST_PAUSE_AT_STEP=k`` the first process to complete step k writes its pid to
    ``$DENS_TEST_PAUSE_MARKER`` and waits (up to 2 min) for a preemption signal; it first saves
    the torch RNG state beside the marker, and with ``$DENS_TEST_RESTORE_RNG`` set the resumed
    process restores it before its first forward (fairchem's checkpoint does not hold it, and
    EquiformerV2 draws a random frame for every edge rotation, ``edge_rot_mat.py``)."""

    _records: list[dict[str, Any]]

    def _record_path(self, name: str) -> Path:
        return Path(os.environ[RECORD_DIR]) / f"{name}_rank{distutils.get_rank()}"

    def _compute_loss(self, out: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        if not hasattr(self, "_records"):
            self._records = []
            weights = copy.deepcopy(self._unwrapped_model.state_dict())
            torch.save(weights, f"{self._record_path('initial')}_pid{os.getpid()}.pt")
        counts: collections.Counter = collections.Counter()
        originals = {name: getattr(dist, name) for name in COLLECTIVES}

        def counting(name: str):
            def call(*args: Any, **kwargs: Any) -> Any:
                counts[name] += 1
                return originals[name](*args, **kwargs)

            return call

        for name in COLLECTIVES:
            setattr(dist, name, counting(name))
        try:
            loss = super()._compute_loss(out, batch)
        finally:
            for name, function in originals.items():
                setattr(dist, name, function)
        record = {
            "rank": distutils.get_rank(),
            "world": distutils.get_world_size(),
            "step": self.step,
            "dens_epoch": self._dens_dataset._dens_epoch,
            "loss": loss.item(),
            "lr": self.optimizer.param_groups[0]["lr"],  # the learning rate of this step's update
            "log": dict(self._dens_log),
            "collectives": dict(counts),
        }
        if keys.DENS_MASK in batch:
            record.update(
                {
                    "sample_number": batch.sample_number.cpu(),
                    "natoms": batch.natoms.cpu(),
                    "status": batch[keys.DENS_STATUS].cpu(),
                    "sigma": batch[keys.DENS_SIGMA].cpu(),
                    "mask": batch[keys.DENS_MASK].cpu(),
                    "target": batch[keys.DENS_TARGET].cpu(),
                    "force_input": batch[keys.DENS_FORCE_INPUT].cpu(),
                    "pos": batch.pos.cpu(),
                }
            )
        if not self._records:  # the first step's inputs and outputs of the loss
            record["batch"] = batch.cpu()
            record["out"] = {name: value.detach().cpu() for name, value in out.items()}
        self._records.append(record)
        torch.save(self._records, f"{self._record_path('record')}_pid{os.getpid()}.pt")
        return loss

    def _backward(self, loss: torch.Tensor) -> None:
        super()._backward(loss)
        pause_at = os.environ.get(PAUSE_AT_STEP)
        marker = Path(os.environ.get(PAUSE_MARKER, "/nonexistent"))
        if pause_at is not None and self.step == int(pause_at) and not marker.exists():
            torch.save(torch.get_rng_state(), f"{marker}.rng")
            marker.write_text(str(os.getpid()))  # the state of step k is complete: preempt me now
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.1)

    def _forward(self, batch: Any) -> dict[str, torch.Tensor]:
        rng = Path(f"{os.environ.get(PAUSE_MARKER, '/nonexistent')}.rng")
        if os.environ.get(RESTORE_RNG) and rng.exists() and not hasattr(self, "_rng_restored"):
            torch.set_rng_state(torch.load(rng))
            self._rng_restored = True
        return super()._forward(batch)

    def train(self, disable_eval_tqdm: bool = False) -> None:
        super().train(disable_eval_tqdm=disable_eval_tqdm)
        torch.save(self._unwrapped_model.state_dict(), f"{self._record_path('final')}.pt")


# ---- helpers ---------------------------------------------------------------------------------


def recording_config(emt_data: Path, dataset: str = "IndexedDeNSLmdbDataset", **dens: Any) -> dict:
    """Tiny EquiformerV2+DeNS on 16 structures, 2 epochs, no validation, recording classes."""
    config = tiny_config(emt_data, **dens)
    config["trainer"] = "test_distributed.RecordingTrainer"
    config["dataset"] = {"train": config["dataset"]["train"]}
    config["dataset"]["train"]["format"] = f"test_distributed.{dataset}"
    config["dataset"]["train"]["train_split_settings"] = {"first_n": 16}
    config["optim"].update(max_epochs=2, num_workers=0, batch_size=4)
    config["optim"]["scheduler_params"]["warmup_epochs"] = 0.5
    return config


def launch(
    config: dict, run: Path, *flags: str, env: dict | None = None, wait: bool = True
) -> subprocess.CompletedProcess | subprocess.Popen:
    """``python -m fairchem_dens.launch --mode train --cpu ...`` in a fresh process."""
    run.mkdir(parents=True, exist_ok=True)
    path = write_config(config, run / "config.yml")
    command = [
        sys.executable,
        "-m",
        "fairchem_dens.launch",
        "--mode",
        "train",
        "--config-yml",
        str(path),
        "--cpu",
        "--run-dir",
        str(run),
        "--logdir",
        str(run / "logs"),
        "--seed",
        "0",
        *flags,
    ]
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        RECORD_DIR: str(run),
        **(env or {}),
    }
    if not wait:
        return subprocess.Popen(
            command, cwd=run, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    result = subprocess.run(
        command, cwd=run, env=full_env, capture_output=True, text=True, timeout=420
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return result


def load_records(run: Path, rank: int) -> list[dict]:
    """All steps recorded by ``rank`` in ``run`` (every attempt), sorted by step."""
    records = []
    for path in sorted(run.glob(f"record_rank{rank}_pid*.pt")):
        records += torch.load(path, weights_only=False)
    return sorted(records, key=lambda record: record["step"])


def per_structure(records: list[dict]) -> dict[tuple[int, int], dict[str, Any]]:
    """{(epoch, dataset index): that structure's draw} from step records."""
    found = {}
    for record in records:
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), record["natoms"].cumsum(0)])
        for b, index in enumerate(record["sample_number"].tolist()):
            atoms = slice(int(offsets[b]), int(offsets[b + 1]))
            key = (record["dens_epoch"], index)
            assert key not in found, f"structure {index} seen twice in epoch {key[0]}"
            found[key] = {
                "status": int(record["status"][b]),
                "sigma": float(record["sigma"][b]),
                **{name: record[name][atoms] for name in ("mask", "target", "force_input", "pos")},
            }
    return found


# ---- runs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(emt_data, tmp_path_factory) -> dict[str, Path]:
    """The same config on 2 ranks and on 1 rank (fairchem's local launch: torch elastic with
    gloo for 2 ranks), and a skewed-draw config on 2 ranks through submitit's local executor."""
    root = tmp_path_factory.mktemp("distributed")
    config = recording_config(emt_data, prob=0.5)
    launch(config, root / "two", "--local", "--num-ranks", "2")
    launch(config, root / "one", "--local", "--num-ranks", "1")
    skewed = recording_config(emt_data, dataset="SkewedDeNSLmdbDataset", prob=0.5)
    launch(skewed, root / "skewed", "--submitit-local", "--num-ranks", "2")
    return {"two": root / "two", "one": root / "one", "skewed": root / "skewed"}


@pytest.mark.slow
def test_ranks_corrupt_disjoint_structures(runs):
    ranks = [load_records(runs["two"], rank) for rank in (0, 1)]
    assert [len(records) for records in ranks] == [4, 4]  # 2 epochs x 2 steps on each rank
    assert all(record["world"] == 2 for records in ranks for record in records)
    for epoch in (0, 1):
        seen = [
            {i for r in records if r["dens_epoch"] == epoch for i in r["sample_number"].tolist()}
            for records in ranks
        ]
        assert not seen[0] & seen[1]  # each structure on exactly one rank
        assert seen[0] | seen[1] == set(range(16))


@pytest.mark.slow
def test_rank_draws_equal_one_rank_draws(runs):
    one = per_structure(load_records(runs["one"], 0))
    two = {}
    for rank in (0, 1):
        two.update(per_structure(load_records(runs["two"], rank)))
    assert set(two) == set(one) == {(e, i) for e in (0, 1) for i in range(16)}
    statuses = collections.Counter(draw["status"] for draw in two.values())
    assert statuses[Status.DENS] > 0 and statuses[Status.ORIGINAL] > 0
    for key, draw in two.items():
        reference = one[key]
        assert draw["status"] == reference["status"], key
        assert draw["sigma"] == reference["sigma"], key
        for name in ("mask", "target", "force_input", "pos"):
            assert torch.equal(draw[name], reference[name]), (key, name)
    # the epoch enters the draw: some structure is drawn differently in the two epochs
    assert any(
        two[(0, i)]["status"] != two[(1, i)]["status"]
        or not torch.equal(two[(0, i)]["pos"], two[(1, i)]["pos"])
        for i in range(16)
    )


@pytest.mark.slow
def test_one_collective_per_step(runs):
    for name in ("two", "skewed"):
        for rank in (0, 1):
            records = load_records(runs[name], rank)
            assert records
            assert all(record["collectives"] == {"all_reduce": 1} for record in records), name


@pytest.mark.slow
def test_loss_is_the_global_mean_over_both_ranks(runs, emt_data, tmp_path):
    """The mean over ranks of each rank's loss (DDP averages the gradients of exactly these) is
    the loss of one process given both ranks' batches and model outputs together: every term is
    a global mean over both ranks' structures and atoms.

    (The model outputs are the ranks' own: recomputing them on the joint batch is not exact,
    because fairchem's max_neighbors cut breaks ties between equidistant lattice neighbours
    differently in a different batch.)"""
    first = [load_records(runs["two"], rank)[0] for rank in (0, 1)]
    assert [record["step"] for record in first] == [1, 1]
    joint = Batch.from_data_list(
        first[0]["batch"].to_data_list() + first[1]["batch"].to_data_list()
    )
    out = {name: torch.cat([record["out"][name] for record in first]) for name in first[0]["out"]}
    assert keys.NOISE_OUTPUT in out  # a declared model output, like energy and forces
    config = recording_config(emt_data, prob=0.5)
    config["trainer"] = "fairchem_dens.trainer.DeNSTrainer"
    config["dataset"]["train"]["format"] = "fairchem_dens.datasets.DeNSLmdbDataset"
    with trainer_from_config(config, tmp_path) as trainer:
        trainer.step = 1
        loss = trainer._compute_loss(out, joint).item()
        log = dict(trainer._dens_log)
    assert log["dens_structure_fraction"] > 0  # the joint batch has DeNS structures
    mean = sum(record["loss"] for record in first) / 2
    assert mean == pytest.approx(loss, rel=1e-6)
    for term in ("loss_energy", "loss_forces", "loss_dens"):
        per_rank = [record["log"][term] for record in first]
        assert sum(per_rank) / 2 == pytest.approx(log[term], rel=1e-6, abs=1e-8), term


@pytest.mark.slow
def test_no_hang_when_one_rank_draws_all_dens_and_the_other_none(runs):
    ranks = [load_records(runs["skewed"], rank) for rank in (0, 1)]
    assert [len(records) for records in ranks] == [4, 4]  # both ranks finished every step
    assert all((r["status"] == Status.DENS).all() for r in ranks[0])
    assert all((r["status"] == Status.ORIGINAL).all() for r in ranks[1])
    assert all(r["log"]["loss_dens"] == 0.0 for r in ranks[1])
    assert all(r["log"]["loss_dens"] > 0.0 for r in ranks[0])
    # gradients were averaged over both ranks on every step: the replicas stayed identical
    final = [torch.load(runs["skewed"] / f"final_rank{rank}.pt") for rank in (0, 1)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])
    initial = torch.load(next(runs["skewed"].glob("initial_rank0_pid*.pt")))
    noise_head = [name for name in final[0] if "dens_noise" in name]
    assert any(not torch.equal(final[0][name], initial[name]) for name in noise_head)


# ---- energy-conserving eSEN on two ranks ------------------------------------------------------


@pytest.fixture(scope="module")
def esen_run(emt_data, tmp_path_factory) -> Path:
    """Gradient-force eSEN + DeNS on 2 ranks, rank 0 drawing DeNS for every structure and rank 1
    for none: the rank whose structures train no forces must stay in step with the other."""
    from test_trainer_esen import esen_config

    run = tmp_path_factory.mktemp("distributed_esen") / "skewed"
    config = esen_config(emt_data, prob=0.5)
    recording = recording_config(emt_data, dataset="SkewedDeNSLmdbDataset", prob=0.5)
    transforms = config["dataset"]["train"]["transforms"]  # forces σ = energy σ
    config = {**recording, "model": config["model"]}
    config["dataset"]["train"]["transforms"] = transforms
    launch(config, run, "--local", "--num-ranks", "2")
    return run


@pytest.mark.slow
def test_esen_gradient_forces_two_ranks_stay_in_step_with_one_collective(esen_run):
    ranks = [load_records(esen_run, rank) for rank in (0, 1)]
    assert [len(records) for records in ranks] == [4, 4]
    assert all((r["status"] == Status.DENS).all() for r in ranks[0])
    assert all((r["status"] == Status.ORIGINAL).all() for r in ranks[1])
    assert all(r["collectives"] == {"all_reduce": 1} for records in ranks for r in records)
    final = [torch.load(esen_run / f"final_rank{rank}.pt") for rank in (0, 1)]
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])


@pytest.mark.slow
def test_esen_loss_is_the_global_mean_over_both_ranks(esen_run, emt_data, tmp_path):
    """2 ranks = 1 process on both ranks' batches and outputs: with gradient forces too, each
    term is a global mean (rank 0's DeNS structures train no forces, rank 1's no noise)."""
    from test_trainer_esen import esen_config

    first = [load_records(esen_run, rank)[0] for rank in (0, 1)]
    joint = Batch.from_data_list(
        first[0]["batch"].to_data_list() + first[1]["batch"].to_data_list()
    )
    # rank 1 corrupted nothing, so it declared no noise output: its rows are never read
    noise = [
        r["out"].get(keys.NOISE_OUTPUT, torch.zeros(r["batch"].pos.shape[0], 3)) for r in first
    ]
    out = {name: torch.cat([r["out"][name] for r in first]) for name in ("energy", "forces")}
    out[keys.NOISE_OUTPUT] = torch.cat(noise)
    assert keys.NOISE_OUTPUT in first[0]["out"] and keys.NOISE_OUTPUT not in first[1]["out"]
    config = esen_config(emt_data, prob=0.5)
    with trainer_from_config(config, tmp_path) as trainer:
        assert trainer.gradient_forces
        trainer.step = 1
        loss = trainer._compute_loss(out, joint).item()
        log = dict(trainer._dens_log)
    assert 0 < log["dens_structure_fraction"] < 1
    assert sum(record["loss"] for record in first) / 2 == pytest.approx(loss, rel=1e-6)
    for term in ("loss_energy", "loss_forces", "loss_dens"):
        per_rank = [record["log"][term] for record in first]
        assert sum(per_rank) / 2 == pytest.approx(log[term], rel=1e-6, abs=1e-8), term
    assert first[0]["log"]["loss_forces"] == 0.0  # all-DeNS rank: no force term
