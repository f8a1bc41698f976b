"""Accuracy at equal training steps: no DeNS vs DeNS vs fairchem 1.10's built-in DeNS trainer.

One command (from the repository root)::

    .venv/bin/python benchmarks/accuracy.py              # the whole sweep (~1 h on 2 CPU cores)
    .venv/bin/python benchmarks/accuracy.py --seeds 0 --variants eqv2_plain eqv2_dens  # a subset

Every run trains the same small model for the same number of steps on the held-out EMT dataset
(``common.DATA_ARGS``: 120 systems, seed 2024, train/val split by system) and evaluates on the
same 256 validation frames (a fixed random subset drawn by fairchem's ``sample_n`` from all 18
validation systems) with the EMA weights (``ema_decay`` 0.99). Each run is a separate process
(one thread; ``--jobs`` runs in parallel) that builds the trainer exactly as the stock CLI does.
A run whose ``result.json`` exists is reused (``--force`` reruns it).

Writes ``benchmarks/results/accuracy.{json,md}`` and ``accuracy_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

CODE = common.pin_code()  # before anything imports fairchem_dens

#: name -> (model, variant, DeNS overrides). σ in Å.
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "eqv2_plain": ("eqv2", "plain", {}),
    "eqv2_dens": ("eqv2", "dens", {}),
    "eqv2_dens_s0.25": ("eqv2", "dens", {"sigma_high": 0.25}),
    "eqv2_dens_sh": ("eqv2", "dens", {"target_scale": "sigma_high"}),
    "eqv2_dens_nofe": ("eqv2", "dens_nofe", {}),
    "eqv2_builtin": ("eqv2", "builtin", {}),
    "escn_plain": ("escn", "plain", {}),
    "escn_dens": ("escn", "dens", {}),
    "eqv2_builtin_noextra": ("eqv2", "builtin_noextra", {}),
    # investigation (seed 0 by default): p_DeNS, and three times the steps
    "eqv2_dens_p0.25": ("eqv2", "dens", {"prob": 0.25}),
    "eqv2_plain_3ep": ("eqv2", "plain", {}),
    "eqv2_dens_3ep": ("eqv2", "dens", {}),
    "eqv2_dens_p0.25_3ep": ("eqv2", "dens", {"prob": 0.25}),
}
#: Runs of these variants train for this many epochs instead of EPOCHS.
EPOCHS_OF = {"eqv2_plain_3ep": 3, "eqv2_dens_3ep": 3, "eqv2_dens_p0.25_3ep": 3}
LABELS = {
    "eqv2_plain": "EquiformerV2, no DeNS",
    "eqv2_dens": "EquiformerV2 + DeNS (ours, σ_high 0.5)",
    "eqv2_dens_s0.25": "EquiformerV2 + DeNS (ours, σ_high 0.25)",
    "eqv2_dens_sh": "EquiformerV2 + DeNS (ours, target ε/σ_high)",
    "eqv2_dens_nofe": "EquiformerV2 + DeNS, no force encoding (ours, σ_high 0.5)",
    "eqv2_builtin": "EquiformerV2 + DeNS (fairchem 1.10 built-in, σ_high 0.5)",
    "escn_plain": "eSCN, no DeNS",
    "escn_dens": "eSCN + DeNS (ours, σ_high 0.5)",
    "eqv2_builtin_noextra": "EquiformerV2 + DeNS (built-in minus its extra force term)",
    "eqv2_dens_p0.25": "EquiformerV2 + DeNS (ours, p_DeNS 0.25)",
    "eqv2_plain_3ep": "EquiformerV2, no DeNS, 3 epochs",
    "eqv2_dens_3ep": "EquiformerV2 + DeNS (ours), 3 epochs",
    "eqv2_dens_p0.25_3ep": "EquiformerV2 + DeNS (ours, p_DeNS 0.25), 3 epochs",
}
#: Run after every other variant has all its seeds.
OPTIONAL = (
    "eqv2_dens_s0.25",
    "eqv2_builtin_noextra",
    "eqv2_dens_p0.25",
    "eqv2_plain_3ep",
    "eqv2_dens_3ep",
    "eqv2_dens_p0.25_3ep",
)
#: Variants of the default sweep (the investigation runs are asked for by name).
DEFAULT = [
    "eqv2_plain",
    "eqv2_dens",
    "eqv2_dens_nofe",
    "eqv2_builtin",
    "escn_plain",
    "escn_dens",
    "eqv2_dens_s0.25",
    "eqv2_builtin_noextra",
]


def baseline_of(name: str) -> str:
    """The no-DeNS run a variant is compared with (same model, same number of steps)."""
    model = VARIANTS[name][0]
    return f"{model}_plain_3ep" if name.endswith("_3ep") else f"{model}_plain"


EPOCHS = 1  # 432 steps of 8 structures (one pass over the 3456 training frames)
EVALS_PER_RUN = 4
VAL_FRAMES = 256


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The config of one run (variant, seed, steps)."""
    model, variant, overrides = VARIANTS[spec["name"]]
    data = common.ensure_data()
    dens = {**common.DENS, **overrides, **spec.get("dens", {})}
    config = common.variant_config(variant, data, dens=dens, model=model)
    config["dataset"]["val"]["sample_n"] = spec.get("val_frames", VAL_FRAMES)
    optim = config["optim"]
    optim["max_epochs"] = spec.get("epochs", EPOCHS_OF.get(spec["name"], EPOCHS))
    frames = json.loads((data / "stats.json").read_text())["num_frames"]
    if spec.get("train_frames"):  # smoke tests: a random subset of the training frames
        frames = config["dataset"]["train"]["sample_n"] = spec["train_frames"]
        optim["scheduler_params"]["warmup_epochs"] = 0.25
    steps = optim["max_epochs"] * int(np.ceil(frames / optim["batch_size"]))
    optim["eval_every"] = steps // spec.get("evals", EVALS_PER_RUN)
    optim["checkpoint_every"] = -1
    return config


def worker(spec: dict[str, Any]) -> None:
    """One training run; writes ``result.json`` (validation curve, timings) in its run dir."""
    result = train_and_record(run_config(spec), Path(spec["run_dir"]), spec["seed"])
    common.write_json(Path(spec["run_dir"]) / "result.json", {**spec, **result})


def train_and_record(
    config: dict[str, Any],
    run_dir: Path,
    seed: int,
    extra_val: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train one run as the stock CLI does and record its validation curve and timings.

    Args:
        config: the full run config (validation on ``dataset.val`` every ``optim.eval_every``).
        run_dir: the run's directory.
        seed: the run's seed (``--seed``).
        extra_val: more labelled splits evaluated at every validation (name -> dataset config,
            built like fairchem's val split); their metrics go under ``curve[i][name]``. They
            never steer the run (fairchem's best-checkpoint logic sees ``dataset.val`` only).
    """
    import torch

    from fairchem_dens.testing import close_lmdb

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    curve: list[dict[str, Any]] = []
    load_start = common.load_average()
    eval_seconds = 0.0
    start = time.perf_counter()

    def row(metrics: dict[str, Any]) -> dict[str, float]:
        return {
            key: float(metrics[key]["metric"])
            for key in ("energy_mae", "forces_mae", "forces_cosine_similarity")
        }

    with common.trainer_from_config(config, run_dir, seed=seed) as trainer:
        validate = trainer.validate
        loaders = {
            name: common.eval_loader(trainer, cfg) for name, cfg in (extra_val or {}).items()
        }

        def recording_validate(split: str = "val", disable_tqdm: bool = False) -> dict:
            nonlocal eval_seconds
            began = time.perf_counter()
            metrics = validate(split=split, disable_tqdm=disable_tqdm)
            point: dict[str, Any] = {"step": int(trainer.step), **row(metrics)}
            own = trainer.val_loader
            for name, loader in loaders.items():
                trainer.val_loader = loader
                try:
                    point[name] = row(validate(split="val", disable_tqdm=disable_tqdm))
                finally:
                    trainer.val_loader = own
            curve.append(point)
            eval_seconds += time.perf_counter() - began
            return metrics

        trainer.validate = recording_validate  # instrumentation of this instance only
        steps = config["optim"]["max_epochs"] * len(trainer.train_loader)
        began = time.perf_counter()
        trainer.train(disable_eval_tqdm=True)
        train_seconds = time.perf_counter() - began - eval_seconds
        params = sum(p.numel() for p in trainer.model.parameters())
        for loader in loaders.values():
            close_lmdb(loader.dataset)
    return {
        "steps": steps,
        "params": params,
        "curve": curve,
        "final": curve[-1],
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "seconds_per_step": train_seconds / steps,
        "wall_seconds": time.perf_counter() - start,
        "finished_at": time.time(),
        "load_start": load_start,
        "load_end": common.load_average(),
        "code": CODE,
        "config": config,
    }


def launch(specs: list[dict[str, Any]], jobs: int, script: str = __file__) -> None:
    """Run the specs as subprocesses of ``script --worker SPEC``, ``jobs`` at a time, one thread
    each (benchmark workers of other sweeps on the machine count towards ``jobs``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update(WANDB_MODE="offline", WANDB_DISABLED="true")
    pending = list(specs)
    running: list[tuple[subprocess.Popen, dict[str, Any], Any, float]] = []
    while pending or running:
        # every benchmark worker on the machine counts, those of another sweep included
        while pending and max(len(running), len(running_workers().splitlines())) < jobs:
            spec = pending.pop(0)
            run_dir = Path(spec["run_dir"])
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / "log.txt", "w")
            process = subprocess.Popen(
                [sys.executable, script, "--worker", json.dumps(spec)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=common.ROOT,
            )
            running.append((process, spec, log, time.perf_counter()))
            print(f"started {spec['name']} seed {spec['seed']}", flush=True)
        time.sleep(2)
        for item in list(running):
            process, spec, log, began = item
            if process.poll() is None:
                continue
            log.close()
            running.remove(item)
            status = "ok" if process.returncode == 0 else f"FAILED rc={process.returncode}"
            print(
                f"finished {spec['name']} seed {spec['seed']}: {status} "
                f"({time.perf_counter() - began:.0f} s; load {common.load_average()})",
                flush=True,
            )


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of the final validation MAEs, and changes vs the baseline."""
    summary: dict[str, Any] = {}
    for name in VARIANTS:
        runs = [r for r in results if r["name"] == name]
        if not runs:
            continue
        energy = np.array([r["final"]["energy_mae"] for r in runs]) * 1000  # meV
        forces = np.array([r["final"]["forces_mae"] for r in runs]) * 1000  # meV/Å
        summary[name] = {
            "label": LABELS[name],
            "seeds": [r["seed"] for r in runs],
            "steps": runs[0]["steps"],
            "params": runs[0]["params"],
            "energy_mae_meV": {
                "mean": energy.mean(),
                "std": energy.std(ddof=1) if len(runs) > 1 else 0.0,
                "values": energy.tolist(),
            },
            "forces_mae_meV_per_A": {
                "mean": forces.mean(),
                "std": forces.std(ddof=1) if len(runs) > 1 else 0.0,
                "values": forces.tolist(),
            },
            "seconds_per_step": float(np.median([r["seconds_per_step"] for r in runs])),
            "wall_seconds_per_run": float(np.mean([r["wall_seconds"] for r in runs])),
        }
    for name, entry in summary.items():
        base = summary.get(baseline_of(name))
        if base is None or name == baseline_of(name):
            continue
        for key in ("energy_mae_meV", "forces_mae_meV_per_A"):
            entry[key]["change_vs_no_dens_percent"] = 100 * (
                entry[key]["mean"] / base[key]["mean"] - 1
            )
    return json.loads(json.dumps(summary, default=float))


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# Accuracy at equal training steps (generated by benchmarks/accuracy.py)",
        "",
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, no GPU; torch "
        f"{meta['machine']['torch']}, fairchem-core {meta['machine']['fairchem_core']}. "
        f"Load average before: {meta['load_before']}, after: {meta['load_after']}. "
        f"Sweep: {meta['runs']} runs, {meta['run_seconds_total'] / 3600:.2f} h of run time, "
        f"{meta['sweep_seconds'] / 60:.0f} min wall ({meta['jobs']} runs in parallel, 1 thread "
        f"each; other jobs shared the machine). Code: fairchem_dens at {meta['commits']}.",
        "",
        f"Data: {meta['data']}. Validation: {VAL_FRAMES} frames of the val split (all 18 val "
        "systems), EMA weights (decay 0.99). MAE after the last step; mean ± std over seeds.",
        "",
        "| variant | seeds | steps | params | energy MAE (meV) | Δ | force MAE (meV/Å) | Δ "
        "| s/step | min/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in summary.values():
        energy, forces = entry["energy_mae_meV"], entry["forces_mae_meV_per_A"]

        def change(block: dict[str, Any]) -> str:
            value = block.get("change_vs_no_dens_percent")
            return "–" if value is None else f"{value:+.1f}%"

        lines.append(
            f"| {entry['label']} | {len(entry['seeds'])} | {entry['steps']} | "
            f"{entry['params'] / 1e3:.0f}k | {energy['mean']:.1f} ± {energy['std']:.1f} | "
            f"{change(energy)} | {forces['mean']:.2f} ± {forces['std']:.2f} | {change(forces)} | "
            f"{entry['seconds_per_step']:.3f} | {entry['wall_seconds_per_run'] / 60:.1f} |"
        )
    lines.append("")
    lines.append("Δ: change of the mean vs the same model without DeNS (negative = better).")
    return "\n".join(lines) + "\n"


PANELS = [
    (
        "EquiformerV2",
        [
            "eqv2_plain",
            "eqv2_dens",
            "eqv2_dens_s0.25",
            "eqv2_dens_nofe",
            "eqv2_builtin",
            "eqv2_builtin_noextra",
        ],
    ),
    ("eSCN", ["escn_plain", "escn_dens"]),
    (
        "EquiformerV2: p_DeNS and steps",
        [
            "eqv2_plain",
            "eqv2_dens",
            "eqv2_dens_p0.25",
            "eqv2_plain_3ep",
            "eqv2_dens_3ep",
            "eqv2_dens_p0.25_3ep",
        ],
    ),
]


def plot(results: list[dict[str, Any]], path: Path) -> None:
    done = {r["name"] for r in results}
    # a panel is drawn when a variant it alone shows has results (the last one shares two)
    panels = [
        (
            f"{title}: validation",
            [
                (
                    LABELS[name],
                    "--" if name.endswith("_3ep") else "-",
                    [[(p["step"], p) for p in r["curve"]] for r in results if r["name"] == name],
                )
                for name in names
            ],
        )
        for index, (title, names) in enumerate(PANELS)
        if done & set(names[2:] if index == len(PANELS) - 1 else names)
    ]
    title = "Validation MAE (EMA weights) vs step; mean ± std over seeds"
    common.plot_curves(panels, path, title)


def running_workers() -> str:
    """The command lines of this machine's benchmark worker processes, joined (Linux /proc)."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "--worker" in text and "benchmarks/" in text:
            lines.append(text)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=DEFAULT, choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 thread each)")
    parser.add_argument("--force", action="store_true", help="rerun runs that have results")
    parser.add_argument(
        "--runs", nargs="+", metavar="NAME:SEED", help="an explicit ordered list of runs instead"
    )
    parser.add_argument(
        "--skip-running",
        action="store_true",
        help="skip runs that a worker process (of another sweep) is running now",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    common.ensure_data()
    load_before = common.load_average()
    machine = common.machine()
    began = time.perf_counter()
    root = common.RUNS / "accuracy"
    # seed-major, optional variants last: a stopped sweep still has every main variant
    order = [
        (name, seed)
        for optional in (False, True)
        for seed in args.seeds
        for name in args.variants
        if (name in OPTIONAL) == optional
    ]
    if args.runs:
        order = [(item.rsplit(":", 1)[0], int(item.rsplit(":", 1)[1])) for item in args.runs]
        unknown = [name for name, _ in order if name not in VARIANTS]
        if unknown:
            parser.error(f"--runs: unknown variant {unknown[0]!r}")
    running = running_workers() if args.skip_running else ""
    specs = []
    for name, seed in order:
        run_dir = root / f"{name}_seed{seed}"
        if not args.force and (run_dir / "result.json").exists():
            continue
        if args.skip_running and f'"{run_dir}"' in running:
            continue
        specs.append({"name": name, "seed": seed, "run_dir": str(run_dir)})
    launch(specs, args.jobs)
    sweep_seconds = time.perf_counter() - began

    results = []
    for path in sorted(root.glob("*/result.json")):
        result = json.loads(path.read_text())
        if result["name"] in VARIANTS:
            result.pop("config")
            result.setdefault("finished_at", path.stat().st_mtime)
            # a run stopped (SIGSTOP) while overhead.py ran gets "paused_seconds" added by hand;
            # the pause is taken off its training time (it fell in training, not evaluation)
            paused = result.get("paused_seconds", 0.0)
            result["train_seconds"] -= paused
            result["wall_seconds"] -= paused
            result["seconds_per_step"] = result["train_seconds"] / result["steps"]
            results.append(result)
    summary = summarise(results)
    paused = sum(r.get("paused_seconds", 0.0) for r in results)
    started = min(
        r["finished_at"] - r["wall_seconds"] - r.get("paused_seconds", 0.0) for r in results
    )
    finished = max(r["finished_at"] for r in results)
    meta = {
        "code": CODE,
        "machine": machine,
        "load_before": load_before,
        "load_after": common.load_average(),
        "sweep_seconds": finished - started,
        "paused_seconds": paused,
        "this_invocation_seconds": sweep_seconds,
        "run_seconds_total": sum(r["wall_seconds"] for r in results),
        "runs": len(results),
        "runs_launched": len(specs),
        "commits": sorted({str(r.get("code", {}).get("commit")) for r in results}),
        "jobs": args.jobs,
        "data": f"fairchem_dens.data.generate({common.DATA_ARGS}) — "
        "3456 train frames (84 systems), 752 val frames (18 systems)",
        "dens": common.DENS,
        "epochs": EPOCHS,
        "val_frames": VAL_FRAMES,
    }
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    common.write_json(
        common.RESULTS / "accuracy.json", {"meta": meta, "summary": summary, "runs": results}
    )
    (common.RESULTS / "accuracy.md").write_text(markdown(summary, meta))
    plot(results, common.RESULTS / "accuracy_curves.png")
    print((common.RESULTS / "accuracy.md").read_text())


if __name__ == "__main__":
    main()
