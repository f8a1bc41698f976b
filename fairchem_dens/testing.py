"""Helpers for tests and benchmarks: build a trainer in-process exactly as the stock CLI does.

Used by ``tests/`` and ``benchmarks/``; nothing in the method imports this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

#: Trainer attributes that may hold an LMDB-backed dataset.
DATASET_ATTRIBUTES = ("train_dataset", "val_dataset", "test_dataset", "relax_dataset")


def close_lmdb(dataset: Any) -> None:
    """Close a dataset's LMDB environments (lmdb 3 refuses to open one file twice per process);
    ``dataset`` may be a fairchem ``Subset`` wrapping the LMDB or ASE-DB dataset, or ``None``.
    For an ASE-DB dataset (``.aselmdb``) every database of ``dbs`` is closed."""
    while dataset is not None and not hasattr(dataset, "path") and not hasattr(dataset, "dbs"):
        dataset = getattr(dataset, "dataset", None)
    for db in getattr(dataset, "dbs", None) or ():
        if hasattr(db, "close"):
            db.close()
    for env in getattr(dataset, "envs", None) or [getattr(dataset, "env", None)]:
        if env is not None:
            env.close()


def close_datasets(trainer: Any) -> None:
    """Close the LMDB environments of every dataset of a trainer."""
    for name in DATASET_ATTRIBUTES:
        close_lmdb(getattr(trainer, name, None))


def cli_config(
    config: dict[str, Any],
    run_dir: Path,
    seed: int = 0,
    mode: str = "train",
    extra_args: Sequence[str] = (),
) -> dict[str, Any]:
    """The config dict ``fairchem --mode MODE --config-yml run_dir/config.yml --cpu`` builds
    (``config`` is written there first)."""
    from fairchem.core.common.flags import flags
    from fairchem.core.common.utils import build_config

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = ["--mode", mode, "--config-yml", str(path), "--cpu", "--run-dir", str(run_dir)]
    args, overrides = flags.get_parser().parse_known_args([*argv, "--seed", str(seed), *extra_args])
    return build_config(args, overrides)


@contextlib.contextmanager
def cli_trainer(
    config: dict[str, Any],
    run_dir: Path,
    seed: int = 0,
    mode: str = "train",
    extra_args: Sequence[str] = (),
) -> Iterator[Any]:
    """Yield the trainer the stock CLI builds (its config builder and trainer context, a
    one-process gloo group); closes its LMDBs and the process group afterwards, also when the
    trainer fails to build."""
    from fairchem.core.common import distutils
    from fairchem.core.common.utils import new_trainer_context

    built = cli_config(config, run_dir, seed, mode, extra_args)
    distutils.setup_env_local()
    context = new_trainer_context(config=built)
    try:
        ctx = context.__enter__()
    except BaseException as error:
        distutils.cleanup()  # the context only cleans up after a successful start
        traceback = error.__traceback__
        while traceback is not None:  # close the LMDBs of the half-built trainer
            candidate = traceback.tb_frame.f_locals.get("self")
            if hasattr(candidate, "train_dataset"):
                close_datasets(candidate)
            traceback = traceback.tb_next
        raise
    try:
        yield ctx.trainer
    finally:
        close_datasets(ctx.trainer)
        context.__exit__(None, None, None)
