"""Accuracy where the paper shows it: MD17-style molecules, few frames, many epochs (issue 14).

The paper's largest DeNS gains are on MD17 (Table 4: Equiformer L_max 2, aspirin forces
7.2 → 5.7 meV/Å, ethanol 3.1 → 2.6; Table 6: without force encoding DeNS is worse). This script
asks the same question on MD17-style data made here (GFN2-xTB Langevin MD at 500 K,
``fairchem_dens.data.molecules``): one molecule, a few hundred training frames, many epochs, where
the model without DeNS over-fits.

Protocol (fixed before any run):

* Data: ``generate_molecules`` with ``DATA_ARGS`` (ethanol 950 train / 50 val / 1000 test
  frames; aspirin, whose MD costs 7× more, 200 / 50 / 400; split at random). The first
  ``--train-frames`` frames of the train split train (the split is already in random order); the
  **val** split (50 frames) is the tune split (it alone may steer a choice); the **test** split
  is the reported split; nothing is chosen on it.
* Model: a small EquiformerV2 (L_max 2, as the paper's Equiformer L_max 2), the same for every
  variant (the molecule's box is large enough that the periodic graph is the molecular one).
* Variants (``VARIANTS``): no DeNS; DeNS with the paper's Table 9 values (fixed σ 0.05 Å,
  p_DeNS 0.25, r_DeNS 0.25, λ_DeNS 5 decayed linearly to 0, λ_E 1 / λ_F 80 for ethanol and aspirin);
  the same without force encoding (Table 6); the same with λ_E = 0 on DeNS structures
  (``energy_on_dens: false``).
* Paired: for one seed every variant starts from the same initial weights (the DeNS-only modules
  draw from their own stream, ``fairchem_dens.dens_only``) and sees the same batches (fairchem's
  sampler is seeded by the run seed; the corruption has its own generator).
* Equal epochs and steps for every variant. Each run is its own process with one thread; runs
  are resumable (a run with ``result.json`` is reused).

Model families (``--model``, ``FAMILIES``): ``equiformer_v2`` (direct forces, the variants above)
and ``esen`` (issue 15: energy-conserving eSEN, forces = −∂E/∂r, no DeNS / DeNS / DeNS without
force encoding; 100 frames, 150 epochs, sized for one 2-core session; report
``molecules_esen.{json,md}``).

One command (from the repository root)::

    .venv/bin/python benchmarks/molecules.py                       # everything, then the report
    .venv/bin/python benchmarks/molecules.py --molecules ethanol --seeds 0 --variants plain dens
    .venv/bin/python benchmarks/molecules.py --report               # tables and plots only
    .venv/bin/python benchmarks/molecules.py --model esen --molecules ethanol   # eSEN rows

Writes ``benchmarks/results/molecules.{json,md}`` and ``molecules_curves.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy
import common

CODE = accuracy.CODE

#: The molecular datasets: generated once with these arguments, never edited by hand. Aspirin's
#: GFN2-xTB MD costs ~18 ms per step here (ethanol 2.5 ms), so its dataset is smaller: the 200
#: training frames of the benchmark, the 50 val frames and 400 test frames (67k MD steps).
DATA_ARGS: dict[str, dict[str, Any]] = {
    "ethanol": dict(train=950, val=50, test=1000, temperature=500.0, seed=0),
    "aspirin": dict(train=200, val=50, test=400, temperature=500.0, seed=0),
}
DATA = {
    "ethanol": common.ROOT / "data" / "bench_molecules",
    "aspirin": common.ROOT / "data" / "bench_molecules_aspirin",
}
RUNS = common.RUNS / "molecules"

#: Paper Table 9 (ethanol, aspirin): λ_E, λ_F and the DeNS values; σ in Å.
LOSS_COEFFICIENTS = {"ethanol": (1.0, 80.0), "aspirin": (1.0, 80.0)}
DENS = dict(
    prob=0.25,  # p_DeNS
    sigma=0.05,  # σ (fixed, single-scale)
    corrupt_ratio=0.25,  # r_DeNS
    coefficient=5.0,  # λ_DeNS
    schedule="linear",  # decayed linearly to 0 over the run (App. D.2)
    candidates="all",  # molecules: every atom may be corrupted
)
#: name -> (label, uses DeNS, backbone switches, DeNS overrides)
VARIANTS: dict[str, tuple[str, bool, dict[str, Any], dict[str, Any]]] = {
    "plain": ("no DeNS", False, {}, {}),
    "dens": ("DeNS (Table 9)", True, {"use_force_encoding": True}, {}),
    "dens_nofe": ("DeNS without force encoding", True, {"use_force_encoding": False}, {}),
    "dens_noE": (
        "DeNS, λ_E = 0 on DeNS structures",
        True,
        {"use_force_encoding": True},
        {"energy_on_dens": False},
    ),
}
#: Paper Table 4 / Table 6 (Equiformer L_max 2, meV and meV/Å): no DeNS, DeNS, DeNS without FE.
PAPER = {
    "ethanol": {"plain": (2.2, 3.1), "dens": (2.2, 2.6), "dens_nofe": (2.3, 3.3)},
    "aspirin": {"plain": (5.3, 7.2), "dens": (5.1, 5.7), "dens_nofe": (8.6, 9.1)},
}

#: The small EquiformerV2 (fairchem EquiformerV2Backbone arguments): L_max 2. The molecules sit in
#: a cubic box with >= 24 Å of vacuum between images (``fairchem_dens.data.molecules``), so the
#: periodic radius graph equals the non-periodic one (tests/test_data_molecules.py); the benchmark
#: uses it (``use_pbc: false`` gives the same graph through torch-cluster's radius_graph).
MODEL = {
    **common.EQV2,
    "use_pbc": True,
    "max_neighbors": 24,
    "max_radius": 5.0,
    "num_layers": 3,
    "sphere_channels": 32,
    "lmax_list": [2],
    "mmax_list": [2],
}
#: The regime of the issue's scouting run (200 frames, 300 epochs = 7500 steps: the model without
#: DeNS fits its training set and has converged). Cost measured here: ~0.5 s of CPU per ethanol
#: step with the evaluations, i.e. ~1 h of CPU per ethanol run (docs/benchmarks.md).
TRAIN_FRAMES = 200
EPOCHS = {"ethanol": 300, "aspirin": 300}
EVALS_PER_RUN = 6

#: The small energy-conserving eSEN (fairchem eSEN_Backbone arguments; issue 15): L_max 2 as the
#: EquiformerV2 above, forces = −∂E/∂r through ``esen_mlp_efs_head``. The envelope keeps the
#: energy smooth at the cutoff (needed for conserving forces).
ESEN = {
    "use_pbc": False,  # the molecular graph through torch-cluster (the PBC graph is the same)
    "otf_graph": True,
    "max_neighbors": 24,
    "cutoff": 5.0,
    "max_num_elements": 90,
    "num_layers": 2,
    "sphere_channels": 16,
    "hidden_channels": 16,
    "edge_channels": 16,
    "num_distance_basis": 16,
    "distance_function": "gaussian",
    "lmax": 2,
    "mmax": 2,
    "norm_type": "rms_norm_sh",
    "act_type": "gate",
    "mlp_type": "grid",
    "use_envelope": True,
    "direct_forces": False,
    "regress_forces": True,
    "regress_stress": False,
}
#: Model families: backbone class, its arguments, the heads without DeNS, the noise head and the
#: variants run for the family. eSEN's forces are gradients of the energy, so its force targets
#: are scaled by the energy's std (as the authors' MD17 code does): −∂(E/σ_E)/∂r = F/σ_E.
FAMILIES: dict[str, dict[str, Any]] = {
    "equiformer_v2": {
        "backbone": "fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone",
        "arguments": MODEL,
        "heads": {
            "energy": {"module": "equiformerV2_scalar_head"},
            "forces": {"module": "equiformerV2_vector_head"},
        },
        "noise_head": "fairchem_dens.heads.EqV2NoiseHead",
        "variants": list(VARIANTS),
        "gradient_forces": False,
        "train_frames": TRAIN_FRAMES,
        "epochs": EPOCHS,
        "evals": EVALS_PER_RUN,
    },
    "esen": {
        "backbone": "fairchem_dens.models.esen.DeNSeSENBackbone",
        "arguments": ESEN,
        "heads": {"efs": {"module": "esen_mlp_efs_head"}},
        "noise_head": "fairchem_dens.heads.eSENNoiseHead",
        "variants": ["plain", "dens", "dens_nofe"],
        "gradient_forces": True,
        # sized to run 3 variants x 3 seeds in one 2-core session (a second-order backward
        # per step: 0.70-0.86 s per step in the committed runs, on shared cores):
        # 100 frames x 150 epochs = 1950 steps per run
        "train_frames": 100,
        "epochs": {"ethanol": 150, "aspirin": 150},
        "evals": 3,
    },
}


def ensure_data(molecule: str) -> Path:
    """Generate a molecule's benchmark data once; returns its folder (splits, normalizers)."""
    folder = DATA[molecule] / molecule
    if not (folder / "normalizers.yml").exists():
        from fairchem_dens.data.molecules import generate_molecules

        generate_molecules(DATA[molecule], molecules=(molecule,), **DATA_ARGS[molecule])
    copy_dir = folder / "train_copy"  # lmdb 3 opens a file once per process
    if not (copy_dir / "data.lmdb").exists():
        shutil.copytree(folder / "train", copy_dir, dirs_exist_ok=True)
    return folder


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The full config of one run: molecule, variant, seed, frames, epochs."""
    molecule, variant = spec["molecule"], spec["variant"]
    _, uses_dens, switches, overrides = VARIANTS[variant]
    data = ensure_data(molecule)
    config = common.base_config(data)
    energy_coefficient, force_coefficient = LOSS_COEFFICIENTS[molecule]
    config["loss_functions"] = [
        {"energy": {"fn": "mae", "coefficient": energy_coefficient}},  # λ_E (Table 9)
        {"forces": {"fn": "l2mae", "coefficient": force_coefficient}},  # λ_F (Table 9)
    ]
    # the first N frames of the (randomly ordered) train split; per split, so val is not cut
    config["dataset"]["train"]["train_split_settings"] = {"first_n": spec["train_frames"]}
    config["dataset"]["val"] = {"src": str(data / "val")}
    optim = config["optim"]
    optim.update(
        max_epochs=spec["epochs"],
        lr_initial=5e-4,  # Equiformer MD17
        # fairchem's EMA has no warm-up: 0.999 keeps 70 % of the initial weights after 350 steps,
        # so short runs would validate near-initial (and, paired, identical) weights
        ema_decay=0.99,
        eval_batch_size=50,
        checkpoint_every=-1,
    )
    optim["optimizer_params"] = {"weight_decay": 1e-6}
    steps_per_epoch = int(np.ceil(spec["train_frames"] / optim["batch_size"]))
    steps = spec["epochs"] * steps_per_epoch
    optim["eval_every"] = steps // spec.get("evals", EVALS_PER_RUN)
    optim["scheduler_params"]["warmup_epochs"] = max(0.02 * spec["epochs"], 1.0)
    family = FAMILIES[spec.get("model", "equiformer_v2")]
    heads = copy.deepcopy(family["heads"])
    backbone = {
        "model": family["backbone"],
        **copy.deepcopy(family["arguments"]),
        "use_force_encoding": False,
    }
    if family["gradient_forces"]:  # forces in units of the energy's std: F/σ_E = −∂(E/σ_E)/∂r
        transforms = config["dataset"]["train"]["transforms"]["normalizer"]
        transforms["forces"] = {"mean": 0.0, "rmsd": transforms["energy"]["rmsd"]}
    if uses_dens:
        backbone.update(switches)
        heads["dens_noise"] = {"module": family["noise_head"]}
        optim["dens"] = {**DENS, **overrides}
    config["trainer"] = "fairchem_dens.trainer.DeNSTrainer"
    config["model"] = {
        "name": "hydra",
        "pass_through_head_outputs": True,
        "otf_graph": True,
        "backbone": backbone,
        "heads": heads,
    }
    return config


def extra_splits(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Test split (reported) and the training frames (train error), evaluated at every
    validation; they never steer the run."""
    data = DATA[spec["molecule"]] / spec["molecule"]
    return {
        "test": {"src": str(data / "test")},
        "train": {"src": str(data / "train_copy"), "first_n": spec["train_frames"]},
    }


def worker(spec: dict[str, Any]) -> None:
    """One training run; writes ``result.json`` in its run directory."""
    config = run_config(spec)
    result = accuracy.train_and_record(
        config, Path(spec["run_dir"]), spec["seed"], extra_val=extra_splits(spec)
    )
    result["code"] = CODE
    common.write_json(Path(spec["run_dir"]) / "result.json", {**spec, **result})


def run_name(molecule: str, variant: str, seed: int, frames: int, model: str) -> str:
    prefix = "" if model == "equiformer_v2" else f"{model}_"
    return f"{prefix}{molecule}_{variant}_n{frames}_seed{seed}"


def results_stem(model: str) -> str:
    """File stem of a family's report in benchmarks/results/."""
    return "molecules" if model == "equiformer_v2" else f"molecules_{model}"


# ---- report ----------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> dict[str, Any]:
    array = np.asarray(values, dtype=float)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if array.size > 1 else 0.0,
        "values": array.tolist(),
    }


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (molecule, frames, variant): final test/val/train MAEs over seeds, paired changes."""
    summary: dict[str, Any] = {}
    groups = sorted({(r["molecule"], r["train_frames"]) for r in results})
    for molecule, frames in groups:
        block: dict[str, Any] = {}
        plain = {
            r["seed"]: r
            for r in results
            if (r["molecule"], r["train_frames"], r["variant"]) == (molecule, frames, "plain")
        }
        for variant in VARIANTS:
            runs = sorted(
                (
                    r
                    for r in results
                    if (r["molecule"], r["train_frames"], r["variant"])
                    == (molecule, frames, variant)
                ),
                key=lambda r: r["seed"],
            )
            if not runs:
                continue
            entry: dict[str, Any] = {
                "label": VARIANTS[variant][0],
                "seeds": [r["seed"] for r in runs],
                "steps": runs[0]["steps"],
                "epochs": runs[0]["epochs"],
                "params": runs[0]["params"],
                "minutes_per_run": float(np.mean([r["wall_seconds"] for r in runs]) / 60),
            }
            for split in ("test", "val", "train"):
                for key, unit in (("energy_mae", "meV"), ("forces_mae", "meV_per_A")):

                    def value(r: dict[str, Any], split: str = split, key: str = key) -> float:
                        point = r["final"] if split == "val" else r["final"][split]
                        return 1000 * point[key]

                    stats = _mean_std([value(r) for r in runs])
                    paired = [
                        100 * (value(r) / value(plain[r["seed"]]) - 1)
                        for r in runs
                        if r["seed"] in plain and variant != "plain"
                    ]
                    if paired:
                        stats["paired_change_percent"] = paired
                        stats["change_of_mean_percent"] = 100 * (
                            stats["mean"]
                            / np.mean([value(plain[r["seed"]]) for r in runs if r["seed"] in plain])
                            - 1
                        )
                    entry[f"{split}_{key}_{unit}"] = stats
            paper = PAPER.get(molecule, {})
            if variant in paper and "plain" in paper:
                entry["paper_energy_change_percent"] = 100 * (
                    paper[variant][0] / paper["plain"][0] - 1
                )
                entry["paper_forces_change_percent"] = 100 * (
                    paper[variant][1] / paper["plain"][1] - 1
                )
            block[variant] = entry
        summary[f"{molecule}_n{frames}"] = block
    return summary


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    machine = meta["machine"]
    lines = [
        f"# MD17-style molecules, {meta['model_family']}: DeNS vs no DeNS (generated by "
        "benchmarks/molecules.py)",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, no GPU lent; torch "
        f"{machine['torch']}, fairchem-core {machine['fairchem_core']}. {meta['runs']} runs, "
        f"{meta['run_seconds_total'] / 3600:.2f} h of run time, {meta['sweep_seconds'] / 60:.0f} "
        "min wall (2 runs in parallel, 1 thread each). Code: fairchem_dens at "
        f"{', '.join(meta['commits'])}.",
        "",
        f"Data: {meta['data']}. Labels are GFN2-xTB, not MD17's DFT: compare relative changes "
        "with the paper, not absolute MAEs. Test = 1000 held-out frames (reported); EMA weights "
        "after the last step; mean ± std over seeds; Δ = change of the mean vs no DeNS; paired = "
        "per-seed change vs the no-DeNS run of the same seed (same initial weights, same batches).",
        "",
    ]
    for group, block in summary.items():
        first = next(iter(block.values()))
        lines += [
            f"## {group.replace('_n', ', ')} training frames, {first['epochs']} epochs "
            f"({first['steps']} steps)",
            "",
            "| variant | seeds | test force MAE (meV/Å) | Δ | paired per seed | paper Δ "
            "| test energy MAE (meV) | Δ | paper Δ | train force MAE | val force MAE | min/run |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for entry in block.values():
            f = entry["test_forces_mae_meV_per_A"]
            e = entry["test_energy_mae_meV"]

            def change(stats: dict[str, Any]) -> str:
                value = stats.get("change_of_mean_percent")
                return "–" if value is None else f"{value:+.1f}%"

            paired = ", ".join(f"{v:+.1f}%" for v in f.get("paired_change_percent", [])) or "–"
            paper_f = entry.get("paper_forces_change_percent")
            paper_e = entry.get("paper_energy_change_percent")
            lines.append(
                f"| {entry['label']} | {len(entry['seeds'])} | {f['mean']:.1f} ± {f['std']:.1f} "
                f"| {change(f)} | {paired} | "
                f"{'–' if paper_f is None else f'{paper_f:+.1f}%'} | "
                f"{e['mean']:.1f} ± {e['std']:.1f} | {change(e)} | "
                f"{'–' if paper_e is None else f'{paper_e:+.1f}%'} | "
                f"{entry['train_forces_mae_meV_per_A']['mean']:.1f} | "
                f"{entry['val_forces_mae_meV_per_A']['mean']:.1f} | "
                f"{entry['minutes_per_run']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    panels = []
    for molecule, frames in sorted({(r["molecule"], r["train_frames"]) for r in results}):
        for split in ("test", "train"):
            curves = []
            for variant, (label, *_rest) in VARIANTS.items():
                runs = [
                    [(p["step"], p[split]) for p in r["curve"]]
                    for r in results
                    if (r["molecule"], r["train_frames"], r["variant"])
                    == (molecule, frames, variant)
                ]
                curves.append((label, "-" if split == "test" else "--", runs))
            panels.append((f"{molecule}, {frames} frames, {split}", curves))
    common.plot_curves(panels, path, "MAE (EMA weights) vs step; mean ± std over seeds")


def report(model: str = "equiformer_v2") -> None:
    results = []
    for path in sorted(RUNS.glob("*/result.json")):
        result = json.loads(path.read_text())
        result.pop("config", None)
        if result.get("model", "equiformer_v2") == model:
            results.append(result)
    if not results:
        print(f"no finished {model} runs")
        return
    stem = results_stem(model)
    summary = summarise(results)
    started = min(r["finished_at"] - r["wall_seconds"] for r in results)
    meta = {
        "code": CODE,
        "machine": common.machine(),
        "runs": len(results),
        "run_seconds_total": sum(r["wall_seconds"] for r in results),
        "sweep_seconds": max(r["finished_at"] for r in results) - started,
        "commits": sorted({str(r.get("code", {}).get("commit")) for r in results}),
        "data": "; ".join(
            f"{m}: fairchem_dens.data.generate_molecules(molecules=({m!r},), {args})"
            for m, args in DATA_ARGS.items()
        ),
        "dens": DENS,
        "model_family": model,
        "model": FAMILIES[model]["arguments"],
        "normalizers": {
            m: yaml.safe_load((DATA[m] / m / "normalizers.yml").read_text())
            for m in DATA_ARGS
            if (DATA[m] / m / "normalizers.yml").exists()
        },
    }
    common.write_json(
        common.RESULTS / f"{stem}.json", {"meta": meta, "summary": summary, "runs": results}
    )
    (common.RESULTS / f"{stem}.md").write_text(markdown(summary, meta))
    plot(results, common.RESULTS / f"{stem}_curves.png")
    print((common.RESULTS / f"{stem}.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--molecules", nargs="+", default=list(DATA_ARGS), choices=list(DATA_ARGS))
    parser.add_argument("--model", default="equiformer_v2", choices=list(FAMILIES))
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), help="default: the family's"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-frames", type=int, help="default: the family's (FAMILIES)")
    parser.add_argument("--epochs", type=int, help="default: the family's, per molecule")
    parser.add_argument("--evals", type=int, help="validations per run (default: the family's)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 thread each)")
    parser.add_argument("--force", action="store_true", help="rerun runs that have results")
    parser.add_argument("--report", action="store_true", help="only write the report")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    family = FAMILIES[args.model]
    frames = args.train_frames or family["train_frames"]
    if not args.report:
        for molecule in args.molecules:
            ensure_data(molecule)
        running = accuracy.running_workers()  # runs another launcher started and still runs
        specs = []
        # seed-major: a stopped sweep has every variant of the first seeds
        for seed in args.seeds:
            for molecule in args.molecules:
                for variant in args.variants or FAMILIES[args.model]["variants"]:
                    name = run_name(molecule, variant, seed, frames, args.model)
                    run_dir = RUNS / name
                    if (run_dir / "result.json").exists() and not args.force:
                        continue
                    if f'"{run_dir}"' in running:
                        continue
                    specs.append(
                        {
                            "model": args.model,
                            "molecule": molecule,
                            "variant": variant,
                            "seed": seed,
                            "train_frames": frames,
                            "epochs": args.epochs or family["epochs"][molecule],
                            "evals": args.evals or family["evals"],
                            "run_dir": str(run_dir),
                            "name": name,
                        }
                    )
        began = time.perf_counter()
        accuracy.launch(specs, args.jobs, script=__file__)
        print(f"sweep: {len(specs)} runs in {(time.perf_counter() - began) / 60:.1f} min")
    report(args.model)


if __name__ == "__main__":
    main()
