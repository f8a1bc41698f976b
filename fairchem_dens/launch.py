"""Run a fairchem(-dens) job on N CPU ranks: locally, through submitit's local executor, or on a
SLURM cluster through submitit, with a gloo process group.

fairchem 1.10's own ``fairchem ... --submit`` is the path for GPU clusters. It cannot run a CPU
job: under SLURM its set-up (``fairchem.core.common.distutils.setup``) calls
``torch.cuda.set_device`` and hard-codes the NCCL backend, and without SLURM its job dies with
``KeyError: 'local_rank'`` on submitit's local executor while the command still exits 0. This
launcher reuses everything else of fairchem: the config is built by fairchem's ``build_config``
from fairchem's own flags, the job is fairchem's ``Runner`` (``fairchem/core/_cli.py``, so
preemption checkpoints and requeues exactly as with ``--submit``), and the process group is set
up by fairchem's ``distutils.setup`` on its local (``env://``) path, with environment variables
taken from the submitit job. Only the rendezvous variables are ours.

Usage::

    python -m fairchem_dens.launch --mode train --config-yml CFG --cpu --num-ranks 2 --local
    python -m fairchem_dens.launch --mode train --config-yml CFG --cpu --num-ranks 4 --slurm
    python -m fairchem_dens.launch --mode train --config-yml CFG --cpu --num-ranks 2 \
        --submitit-local
    python -m fairchem_dens.launch --check logs   # job results (ours or stock --submit)

Every other argument is fairchem's (``--run-dir``, ``--identifier``, ``--seed``, ``--checkpoint``,
``--logdir``, ``--slurm-partition``, ``--slurm-mem``, ``--slurm-timeout``, config overrides such
as ``--optim.max_epochs=2``). ``--local`` is fairchem's own local launch (``_cli.main``: one
process, or torch elastic with gloo for N ranks, which forces ``optim.num_workers`` to 0).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from fairchem.core._cli import Runner

#: Exit code of a launch whose job failed (or could not be submitted).
FAILED = 1

#: One-line diagnosis of the stock ``--submit`` run on submitit's local executor.
LOCAL_RANK_HINT = (
    "fairchem's --submit ran on submitit's local executor (no SLURM on this machine), where its "
    "distributed set-up never runs; use python -m fairchem_dens.launch --local (or "
    "--submitit-local) instead"
)


class LaunchError(RuntimeError):
    """A launch that cannot go ahead; the message is one line naming the flag or file."""


class GlooRunner(Runner):
    """fairchem's ``Runner`` with a gloo process group from the submitit job's environment.

    In each submitit task it sets the ``env://`` rendezvous variables (``MASTER_ADDR``,
    ``MASTER_PORT``, ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``) and leaves ``config['submit']``
    false, so fairchem's ``distutils.setup`` takes its local path with
    ``config['distributed_backend']`` (gloo for ``--cpu``). Preemption is fairchem's: submitit
    calls :meth:`checkpoint` on rank 0, which saves ``checkpoint.pt`` with the training state and
    resubmits the same config pointing at it.
    """

    def __call__(self, config: dict[str, Any]) -> None:
        import submitit
        from fairchem.core.common.distutils import CURRENT_DEVICE_STR

        self._submitted_config = config
        env = submitit.JobEnvironment()
        if env.num_tasks != config["world_size"]:
            raise LaunchError(
                f"world_size={config['world_size']}: the job has {env.num_tasks} tasks; "
                "submit with tasks_per_node * nodes = --num-ranks"
            )
        single_node = env.num_nodes == 1
        os.environ.update(
            MASTER_ADDR="127.0.0.1" if single_node else env.hostnames[0],
            MASTER_PORT=str(rendezvous_port(str(env.job_id))),
            RANK=str(env.global_rank),
            LOCAL_RANK=str(env.local_rank),
            WORLD_SIZE=str(env.num_tasks),
        )
        if config.get("cpu"):
            os.environ[CURRENT_DEVICE_STR] = "cpu"  # the balanced sampler's all_gather device
        super().__call__(config)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """fairchem's checkpoint-and-resubmit, resubmitting this runner class."""
        from submitit.helpers import DelayedSubmission

        if not hasattr(self, "trainer"):  # preempted before the trainer existed: start again
            return DelayedSubmission(GlooRunner(), self._submitted_config)
        submission = super().checkpoint(*args, **kwargs)
        submission.function = GlooRunner()
        return submission


def rendezvous_port(job_id: str) -> int:
    """A TCP port for rank 0's store that every task of one job derives alike (20000-39999)."""
    return 20000 + zlib.crc32(job_id.encode()) % 20000


# ---- command line ----------------------------------------------------------------------------


def _our_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fairchem_dens.launch",
        description="Run fairchem(-dens) on N CPU ranks (gloo): locally or through submitit "
        "(SLURM or local executor). All other arguments are fairchem's.",
        allow_abbrev=False,
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--local",
        dest="where",
        action="store_const",
        const="local",
        help="fairchem's own local launch on this machine (default)",
    )
    where.add_argument(
        "--slurm",
        dest="where",
        action="store_const",
        const="slurm",
        help="submit to SLURM through submitit",
    )
    where.add_argument(
        "--submitit-local",
        dest="where",
        action="store_const",
        const="local-executor",
        help="submit through submitit's local executor (no SLURM needed)",
    )
    parser.add_argument("--num-ranks", type=int, default=1, help="number of ranks (processes)")
    parser.add_argument(
        "--no-wait", action="store_true", help="return after submitting (submitit modes)"
    )
    parser.add_argument(
        "--check",
        type=Path,
        metavar="LOGDIR",
        help="report the results of the submitit jobs under LOGDIR (ours or stock --submit)",
    )
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, argparse.Namespace, list[str]]:
    """Split ``argv`` into (our options, fairchem's flags, fairchem config overrides)."""
    from fairchem.core.common.flags import flags

    ours, rest = _our_parser().parse_known_args(argv)
    if ours.check is not None:
        return ours, argparse.Namespace(), []
    args, overrides = flags.get_parser().parse_known_args(rest)
    ours.where = ours.where or "local"
    ours.slurm_mem_given = any(a == "--slurm-mem" or a.startswith("--slurm-mem=") for a in rest)
    validate(ours, args)
    args.num_gpus = ours.num_ranks // args.num_nodes  # fairchem: world_size = nodes * num_gpus
    return ours, args, overrides


def validate(ours: argparse.Namespace, args: argparse.Namespace) -> None:
    """Raise :class:`LaunchError` (one line naming the flag) on a launch that cannot work."""
    if not args.config_yml.is_file():
        raise LaunchError(f"--config-yml {args.config_yml}: no such file")
    if args.mode is None:
        raise LaunchError("--mode: required (train, predict, run-relaxations or validate)")
    if not args.cpu:
        raise LaunchError(
            "--cpu: this launcher runs CPU (gloo) jobs; for GPUs use the stock "
            "`fairchem ... --submit --num-gpus N` (NCCL)"
        )
    if args.submit:
        raise LaunchError("--submit: fairchem's flag; use --slurm (or --submitit-local) here")
    if ours.num_ranks < 1:
        raise LaunchError(f"--num-ranks {ours.num_ranks}: must be >= 1")
    if args.num_nodes < 1 or ours.num_ranks % args.num_nodes:
        raise LaunchError(
            f"--num-nodes {args.num_nodes}: must be >= 1 and divide --num-ranks {ours.num_ranks}"
        )
    if ours.where != "slurm" and args.num_nodes != 1:
        raise LaunchError(f"--num-nodes {args.num_nodes}: more than one node needs --slurm")
    if ours.where == "slurm" and shutil.which("sbatch") is None:
        raise LaunchError(
            "--slurm: sbatch not found, there is no SLURM on this machine (fairchem's own "
            "--submit would silently fall back to submitit's local executor and its job would "
            "die with KeyError 'local_rank'); use --local or --submitit-local"
        )


# ---- launching -------------------------------------------------------------------------------


def run_local(args: argparse.Namespace, overrides: list[str]) -> int:
    """fairchem's own local launch (``_cli.main``): one process, or elastic with gloo."""
    from fairchem.core import _cli

    _cli.main(args, overrides)
    return 0


def make_executor(ours: argparse.Namespace, args: argparse.Namespace, config: dict) -> Any:
    """The submitit executor with fairchem's ``--submit`` parameters, minus the GPUs."""
    import submitit

    cluster = "slurm" if ours.where == "slurm" else "local"
    executor = submitit.AutoExecutor(
        folder=args.logdir / "%j", cluster=cluster, slurm_max_num_timeout=3
    )
    parameters: dict[str, Any] = dict(
        name=args.identifier or "fairchem-dens",
        timeout_min=args.slurm_timeout * 60,
        nodes=args.num_nodes,
        tasks_per_node=args.num_gpus,
        cpus_per_task=config["optim"].get("num_workers", 0) + 1,
    )
    if cluster == "slurm":
        parameters.update(
            slurm_partition=args.slurm_partition,
            slurm_qos=args.slurm_qos,
            slurm_account=args.slurm_account,
            slurm_additional_parameters=config.get("slurm") or None,
        )
        if ours.slurm_mem_given:  # fairchem's default (80 GB) would not fit a CPU node
            parameters["mem_gb"] = args.slurm_mem
    executor.update_parameters(**parameters)
    return executor


def submit(ours: argparse.Namespace, args: argparse.Namespace, overrides: list[str]) -> int:
    """Build the config with fairchem's ``build_config`` and submit a :class:`GlooRunner`."""
    from fairchem.core.common.utils import build_config

    config = build_config(args, overrides)
    executor = make_executor(ours, args, config)
    config["slurm"] = copy.deepcopy(executor.parameters)
    config["slurm"]["folder"] = str(executor.folder)
    job = executor.submit(GlooRunner(), config)
    logging.info(f"Submitted job {job.job_id} ({ours.num_ranks} ranks); logs: {job.paths.folder}")
    print(f"submitted job {job.job_id}: {job.paths.folder}", flush=True)
    if ours.no_wait:
        return 0
    try:
        wait_for(job, executor.folder, ours.num_ranks, slurm=ours.where == "slurm")
        job.results()
    except Exception as error:  # submitit's FailedJobError / UncompletedJobError
        failures = [d for _, status, d in check_jobs(job.paths.folder) if status == "FAILED"]
        reason = failures[0] if failures else _last_error_line(str(error).split("-----")[0])
        print(f"job {job.job_id} FAILED: {reason}", file=sys.stderr)
        print(f"  log: {job.paths.stderr}", file=sys.stderr)
        return FAILED
    print(f"job {job.job_id} finished: {ours.num_ranks} ranks ok", flush=True)
    return 0


def wait_for(
    job: Any, folder: Path, num_tasks: int, slurm: bool, poll_s: float = 1.0, grace_s: float = 10.0
) -> None:
    """Wait until ``job`` has left the SLURM queue (or its local controller exited) with a result
    pickle from every task.

    Unlike submitit's own wait, this needs no SLURM accounting (``sacct``): it watches ``squeue``
    and the result files. It waits for the job to be gone, not only for the files: after a
    preemption and requeue, a rank of the first attempt may have left a stale error result that
    the requeued attempt overwrites. Raises :class:`LaunchError` when the job is gone and a result
    is still missing after ``grace_s`` seconds (killed, out of time or memory).
    """
    import subprocess

    from submitit.core.utils import JobPaths

    results = [JobPaths(folder, job.job_id, task).result_pickle for task in range(num_tasks)]
    gone_since = None
    while True:
        if slurm:
            queue = subprocess.run(
                ["squeue", "-h", "-j", str(job.job_id)], capture_output=True, text=True
            )
            gone = queue.returncode != 0 or not queue.stdout.strip()
        else:
            gone = job.state != "RUNNING"
        if gone and all(path.exists() for path in results):
            return
        if gone:
            gone_since = gone_since if gone_since is not None else time.monotonic()
            if time.monotonic() - gone_since > grace_s:
                missing = [path.name for path in results if not path.exists()]
                raise LaunchError(
                    f"job {job.job_id}: ended without results {missing} (killed, or out of "
                    f"time/memory); see {job.paths.stderr}"
                )
        time.sleep(poll_s)


# ---- checking submitted jobs -----------------------------------------------------------------


def _last_error_line(trace: str) -> str:
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith(("File ", "^", "---"))]
    last = errors[-1] if errors else (lines[-1] if lines else "unknown error")
    if "KeyError: 'local_rank'" in trace:
        return f"{last}: {LOCAL_RANK_HINT}"
    return last


def check_jobs(logdir: Path) -> list[tuple[str, str, str]]:
    """(job folder, status, detail) for every submitit job under ``logdir``.

    status is ``ok``, ``FAILED`` (detail: the last line of the error, with a hint for the stock
    ``--submit`` on the local executor) or ``no result`` (running, pending, or killed).
    """
    import pickle

    if not logdir.is_dir():
        raise LaunchError(f"--check {logdir}: no such directory")
    found = []
    for submitted in sorted(logdir.rglob("*_submitted.pkl")):
        job = submitted.name[: -len("_submitted.pkl")]
        results = sorted(submitted.parent.glob(f"{job}_*_result.pkl"))
        if not results:
            found.append((str(submitted.parent), "no result", "running, pending or killed"))
            continue
        for result in results:
            with result.open("rb") as handle:
                outcome, value = pickle.load(handle)
            if outcome == "success":
                found.append((str(result), "ok", ""))
            else:
                found.append((str(result), "FAILED", _last_error_line(str(value))))
    return found


def report_jobs(logdir: Path) -> int:
    """Print :func:`check_jobs`; non-zero when a job failed or none was found."""
    jobs = check_jobs(logdir)
    if not jobs:
        print(f"--check {logdir}: no submitit job found", file=sys.stderr)
        return FAILED
    for path, status, detail in jobs:
        print(f"{status}: {path}" + (f": {detail}" if detail else ""))
    return FAILED if any(status == "FAILED" for _, status, _ in jobs) else 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    from fairchem.core.common.utils import setup_logging

    setup_logging()
    try:
        ours, args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        if ours.check is not None:
            return report_jobs(ours.check)
        if ours.where == "local":
            return run_local(args, overrides)
        return submit(ours, args, overrides)
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
