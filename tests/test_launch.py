"""Launching DeNS runs: fairchem's stock ``--submit`` (its SLURM job script for a DeNS config,
and its silent failure without SLURM), ``python -m fairchem_dens.launch`` (bad flags, failed jobs,
preemption and resume of the same run), and a real one-node SLURM cluster
(``scripts/slurm_local.sh``, marked ``slurm``)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from fairchem.core.common.flags import flags
from helpers import FAIRCHEM, tiny_config, write_config
from test_distributed import (
    PAUSE_AT_STEP,
    PAUSE_MARKER,
    RESTORE_RNG,
    ROOT,
    launch,
    load_records,
    recording_config,
)

from fairchem_dens import launch as launcher

# ---- fairchem's stock --submit -----------------------------------------------------------------


def fake_slurm(directory: Path) -> Path:
    """A ``bin`` with an ``sbatch`` that only answers with a job id, and an ``srun`` stub."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sbatch").write_text('#!/bin/sh\necho "Submitted batch job 4242"\n')
    (directory / "srun").write_text("#!/bin/sh\nexit 0\n")
    for name in ("sbatch", "srun"):
        (directory / name).chmod(0o755)
    return directory


def test_stock_submit_writes_a_right_slurm_job_for_a_dens_config(emt_data, tmp_path, monkeypatch):
    """`fairchem --submit --num-gpus 2` on a DeNS config, driven through fairchem's own
    ``_cli.main`` against a fake ``sbatch``: the job script and the pickled submission are what
    a GPU cluster needs (nothing is run)."""
    from fairchem.core import _cli
    from submitit.core.utils import DelayedSubmission

    config = tiny_config(emt_data, prob=0.5)
    config["optim"]["num_workers"] = 2
    path = write_config(config, tmp_path / "config.yml")
    monkeypatch.setenv("PATH", f"{fake_slurm(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    logs = tmp_path / "logs"
    args, overrides = flags.get_parser().parse_known_args(
        [
            "--mode",
            "train",
            "--config-yml",
            str(path),
            "--submit",
            "--num-gpus",
            "2",
            "--num-nodes",
            "1",
            "--slurm-partition",
            "gpu",
            "--slurm-timeout",
            "2",
            "--identifier",
            "dens",
            "--logdir",
            str(logs),
            "--run-dir",
            str(tmp_path),
        ]
    )
    _cli.main(args, overrides)

    script = (logs / "4242" / "4242_submission.sh").read_text()
    for line in (
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --ntasks-per-node=2",  # one task per GPU: fairchem reads SLURM_PROCID/LOCALID
        "#SBATCH --nodes=1",
        "#SBATCH --cpus-per-task=3",  # num_workers + 1
        "#SBATCH --partition=gpu",
        "#SBATCH --time=120",
        "#SBATCH --mem=80GB",
        "#SBATCH --job-name=dens",
        "#SBATCH --signal=USR2@90",  # preemption/timeout signal -> Runner.checkpoint
    ):
        assert line in script.splitlines(), line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert f"{sys.executable} -u -m submitit.core._submit {logs}/%j" in srun

    submission = DelayedSubmission.load(logs / "4242" / "4242_submitted.pkl")
    assert type(submission.function).__qualname__ == "Runner"
    assert type(submission.function).__module__ == "fairchem.core._cli"
    (submitted,) = submission.args
    assert submitted["trainer"] == "fairchem_dens.trainer.DeNSTrainer"
    assert submitted["dataset"]["train"]["format"] == "fairchem_dens.datasets.DeNSLmdbDataset"
    assert submitted["optim"]["dens"]["prob"] == 0.5
    assert submitted["optim"]["num_workers"] == 2  # only the local launch forces 0
    assert submitted["world_size"] == 2 and submitted["submit"] is True
    assert submitted["distributed_backend"] == "nccl"
    assert submitted["slurm"]["gpus_per_node"] == 2
    assert submitted["slurm"]["folder"] == str(logs / "%j")
    (experiment,) = (logs / "exp").glob("*.log")
    assert json.loads(experiment.read_text())["slurm_id"] == "4242"


@pytest.mark.slow
def test_stock_submit_without_slurm_exits_0_but_the_job_dies_and_check_says_why(emt_data, tmp_path):
    config = tiny_config(emt_data, prob=0.5)
    path = write_config(config, tmp_path / "config.yml")
    logs = tmp_path / "logs"
    env = {  # no SLURM on PATH: submitit falls back to its local executor
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "PATH": str(Path(sys.executable).parent),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
    }
    command = [FAIRCHEM, "--mode", "train", "--config-yml", str(path), "--cpu", "--submit"]
    command += ["--logdir", str(logs), "--run-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, timeout=300)
    assert result.returncode == 0  # the stock CLI reports success...
    deadline = time.monotonic() + 240
    while not list(logs.glob("*/*_result.pkl")) and time.monotonic() < deadline:
        time.sleep(1)
    (result_pickle,) = logs.glob("*/*_result.pkl")
    with result_pickle.open("rb") as handle:
        outcome, trace = pickle.load(handle)
    assert outcome == "error" and "KeyError: 'local_rank'" in trace  # ...but the job died

    checked = subprocess.run(
        [sys.executable, "-m", "fairchem_dens.launch", "--check", str(logs)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert checked.returncode == launcher.FAILED
    line = next(line for line in checked.stdout.splitlines() if line.startswith("FAILED"))
    assert "KeyError: 'local_rank'" in line and "local executor" in line


# ---- our launcher: flags and failed jobs ------------------------------------------------------


@pytest.mark.parametrize(
    ("flags_", "message"),
    [
        (["--config-yml", "missing.yml", "--cpu"], r"--config-yml missing.yml: no such file"),
        (["--config-yml", "{config}"], r"--cpu: this launcher runs CPU \(gloo\) jobs"),
        (["--config-yml", "{config}", "--cpu", "--num-ranks", "0"], r"--num-ranks 0: must be"),
        (["--config-yml", "{config}", "--cpu", "--num-ranks", "3", "--num-nodes", "2"], "divide"),
        (["--config-yml", "{config}", "--cpu", "--submit"], r"--submit: fairchem's flag"),
        (["--config-yml", "{config}", "--cpu", "--num-nodes", "2", "--num-ranks", "2"], "--slurm"),
    ],
)
def test_bad_launch_flags_stop_with_one_line(tmp_path, capsys, flags_, message):
    import re

    config = tmp_path / "config.yml"
    config.write_text("trainer: fairchem_dens.trainer.DeNSTrainer\n")
    argv = ["--mode", "train"] + [f.format(config=config) for f in flags_]
    assert launcher.main(argv) == launcher.FAILED
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error
    assert re.search(message, error), error


def test_slurm_flag_without_slurm_says_so(tmp_path, capsys, monkeypatch):
    config = tmp_path / "config.yml"
    config.write_text("trainer: fairchem_dens.trainer.DeNSTrainer\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    argv = ["--mode", "train", "--config-yml", str(config), "--cpu", "--slurm"]
    assert launcher.main(argv) == launcher.FAILED
    error = capsys.readouterr().err.strip()
    assert "--slurm: sbatch not found" in error and "KeyError 'local_rank'" in error


@pytest.mark.slow
def test_a_failed_job_fails_the_launch_with_its_error(emt_data, tmp_path):
    config = recording_config(emt_data, prob=0.5)
    config["optim"]["dens"]["prob"] = 2.0  # the job itself fails on this
    run = tmp_path / "run"
    with pytest.raises(AssertionError) as failed:
        launch(config, run, "--submitit-local", "--num-ranks", "1")
    assert "FAILED: fairchem_dens.config.DeNSConfigError: optim.dens.prob=2.0" in str(failed.value)


# ---- preemption and resume ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def preempted(emt_data, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run, and the same run preempted after step 6 of 8 (mid-epoch 2):
    SIGUSR2 to the rank as SLURM sends it, so submitit calls fairchem's ``Runner.checkpoint``
    (``checkpoint.pt`` with the training state) and requeues the job, which resumes from it.
    Both through submitit's local executor, 1 rank, num_workers 0, linear λ_DeNS schedule.

    fairchem's checkpoint holds weights, optimizer, scheduler, EMA, normalisers and the step, but
    not the torch RNG state, which EquiformerV2 uses for a random frame per edge (its outputs are
    invariant to it only up to float rounding). The test saves the RNG state at the preemption
    point and restores it in the resumed process, to show that it is the only state missing;
    without it the final weights differ by float noise amplified by Adam (docs/scale_out.md)."""
    root = tmp_path_factory.mktemp("preempt")
    config = recording_config(emt_data, prob=0.5, schedule="linear", coefficient=10.0)
    launch(config, root / "straight", "--submitit-local", "--num-ranks", "1")

    run, marker = root / "preempted", root / "preempted" / "paused"
    env = {PAUSE_AT_STEP: "6", PAUSE_MARKER: str(marker), RESTORE_RNG: "1"}
    process = launch(config, run, "--submitit-local", "--num-ranks", "1", env=env, wait=False)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), process.communicate()[0].decode()[-4000:]
        time.sleep(0.5)  # the pid is written before the wait starts
        os.kill(int(marker.read_text()), signal.SIGUSR2)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output.decode()[-4000:]
    return {"straight": root / "straight", "preempted": run}


@pytest.mark.slow
def test_preemption_checkpoints_and_requeues_through_fairchem(preempted):
    run = preempted["preempted"]
    logs = "\n".join(path.read_text() for path in run.glob("logs/*/*_log.*"))
    assert "Checkpointing callback is triggered" in logs  # fairchem's Runner.checkpoint
    assert "Requeued job" in logs  # submitit requeued it
    (checkpoint,) = run.glob("checkpoints/*/checkpoint.pt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["step"] == 6 and state["optimizer"]["state"]
    attempts = sorted(run.glob("record_rank0_pid*.pt"))
    assert len(attempts) == 2  # the preempted process and the resumed one
    steps = sorted([r["step"] for r in torch.load(p, weights_only=False)] for p in attempts)
    assert sorted(steps) == [[1, 2, 3, 4, 5, 6], [7, 8]]


@pytest.mark.slow
def test_resumed_run_is_the_same_run(preempted):
    straight = load_records(preempted["straight"], 0)
    resumed = load_records(preempted["preempted"], 0)
    assert [r["step"] for r in straight] == [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(straight, resumed, strict=True):
        assert a["dens_epoch"] == b["dens_epoch"] == (a["step"] - 1) // 4
        # the same structures and the same corruption draws on every step after the resume
        for name in ("sample_number", "status", "sigma", "mask", "target", "force_input", "pos"):
            assert torch.equal(a[name], b[name]), (a["step"], name)
        # the λ_DeNS schedule continues from the global step (App. D.2)
        assert a["log"]["dens_coefficient"] == b["log"]["dens_coefficient"]
    coefficients = [r["log"]["dens_coefficient"] for r in straight]
    assert coefficients == pytest.approx([10.0 * (1 - step / 8) for step in range(1, 9)])
    # the first step after the resume sees the very weights of the uninterrupted run
    assert straight[6]["loss"] == resumed[6]["loss"]


@pytest.mark.slow
def test_resumed_run_keeps_the_lr_schedule_and_ends_with_the_same_weights(preempted):
    straight = load_records(preempted["straight"], 0)
    resumed = load_records(preempted["preempted"], 0)
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    final = [torch.load(preempted[name] / "final_rank0.pt") for name in ("straight", "preempted")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][name], final[1][name]) for name in final[0])


# ---- a real SLURM cluster -----------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_local_cluster_runs_a_dens_job():
    if shutil.which("slurmctld") is None or shutil.which("slurmd") is None:
        pytest.skip("slurmctld/slurmd not installed (apt-get install slurmctld slurmd ...)")
    if os.geteuid() != 0:
        pytest.skip("scripts/slurm_local.sh needs root (munged runs as the munge user)")
    # not under pytest's tmp_path: its 0700 parents would keep the munge user out
    directory = Path(tempfile.mkdtemp(prefix="fairchem-dens-slurm-", dir="/tmp"))
    directory.chmod(0o755)
    env = {**os.environ, "SLURM_LOCAL_DIR": str(directory), "PY": sys.executable}
    env["OMP_NUM_THREADS"] = "1"
    try:
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "slurm_local.sh"), "all"],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "cluster up in" in output
    assert "finished: 2 ranks ok" in output
    assert "checkpoint ok" in output and "(step 4, SLURM job" in output
    assert "submit-test ok" in output
    assert "stopped slurmctld" in output and "stopped munged" in output
