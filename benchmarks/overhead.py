"""Training-step overhead of DeNS: ours vs the parent (no DeNS) vs fairchem 1.10's built-in DeNS.

One command (from the repository root)::

    .venv/bin/python benchmarks/overhead.py            # ~6 min on one CPU thread
    .venv/bin/python benchmarks/overhead.py --rounds 20 --threads 2

All trainers live in one process (one gloo group, as the CLI sets up) and take turns on the same
batches of 8 training structures: each round draws one batch and runs every arm once on it, in a
random order, after warm-up rounds. A step is what fairchem's training loop does per batch:
forward, loss, training metrics, backward, gradient clipping, optimizer and EMA update.

Arms (EquiformerV2; eSCN has no built-in DeNS, so only the first three):

* ``stock``: fairchem's own backbone/heads and ``equiformerv2_forces`` trainer — the parent;
* ``ours_dens``: ``DeNSTrainer`` + DeNS backbone + noise head on the batch with DeNS fields
  (p_DeNS 0.5 per structure, σ_high 0.5, r 1 on free atoms), i.e. a DeNS training step;
* ``ours_plain``: the same trainer and model on the same batch without DeNS fields;
* ``builtin_dens`` / ``builtin_plain``: fairchem's ``equiformerv2_dens`` trainer and model on a
  batch it corrupts itself (its transform runs in its training loop, so it is timed) / does not
  corrupt. It decides DeNS once per batch with p_DeNS, so its mean step is the p-weighted mix.

Our corruption runs in the dataset's ``__getitem__`` (DataLoader workers), so it is not in a step;
its cost per structure is timed separately and reported as a share of a step.

A scaling section times ``stock`` vs ``ours_dens`` for EquiformerV2 with more layers: the noise head
is one extra block, so its share of the step falls as the backbone deepens (the paper's 89M model
has 12 layers on a GPU).

Writes ``benchmarks/results/overhead.{json,md}`` and ``overhead.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

CODE = common.pin_code()  # before anything imports fairchem_dens

BATCH = 8


def train_step(trainer: Any, batch: Any) -> None:
    """One step of fairchem's ``OCPTrainer.train`` loop body (logging to the trainer's logger)."""
    trainer.model.train()
    out = trainer._forward(batch)
    loss = trainer._compute_loss(out, batch)
    metrics = trainer._compute_metrics(out, batch, trainer.evaluator, {})
    trainer.evaluator.update("loss", loss.item(), metrics)
    trainer._backward(loss)


def builtin_dens_step(trainer: Any, batch: Any) -> None:
    """The built-in trainer's DeNS step: its own batch corruption, then the step."""
    from fairchem.core.models.equiformer_v2.trainers.dens_trainer import (
        add_gaussian_noise_schedule_to_position,
    )

    params = trainer.denoising_pos_params
    batch = add_gaussian_noise_schedule_to_position(
        batch,
        std_low=params.std_low,
        std_high=params.std_high,
        num_steps=params.num_steps,
        corrupt_ratio=params.corrupt_ratio,
        all_atoms=params.all_atoms,
    )
    train_step(trainer, batch)


def make_trainers(model: str, layers: int, arms: list[str], seed: int) -> dict[str, Any]:
    """One trainer per kind of arm, each on its own copy of the benchmark data."""
    kinds = {"stock": "stock", "ours": "dens", "builtin": "builtin"}
    trainers = {}
    for kind, variant in kinds.items():
        if not any(arm.startswith(kind) for arm in arms):
            continue
        data = common.data_copy(kind)
        config = common.variant_config(variant, data, model=model)
        config["model"]["backbone"]["num_layers"] = layers
        config["logger"] = "tensorboard"
        run_dir = common.RUNS / "overhead" / f"{model}_L{layers}_{kind}"
        trainers[kind] = common.build_trainer(config, run_dir, seed)
    if "ours" in trainers:
        trainers["ours"].enable_dens_on_train_data()
    return trainers


def raw_dataset(trainer: Any) -> Any:
    """The LMDB dataset under fairchem's Subset wrappers."""
    dataset = trainer.train_dataset
    while not hasattr(dataset, "path"):
        dataset = dataset.dataset
    return dataset


def batches(trainer: Any, rounds: int, rng: np.random.Generator) -> list[tuple[Any, Any]]:
    """``rounds`` pairs (structures without DeNS fields, the same structures with DeNS fields)."""
    dataset = raw_dataset(trainer)
    out = []
    for _ in range(rounds):
        indices = rng.choice(len(dataset), BATCH, replace=False).tolist()
        config = dataset._dens
        dataset.disable_dens()
        plain = [dataset[i] for i in indices]
        dataset._dens = config  # back on (enable_dens kept the seed and normaliser)
        dens = [dataset[i] for i in indices]
        out.append((plain, dens))
    return out


def time_arms(
    trainers: dict[str, Any], arms: list[str], rounds: int, warmup: int, seed: int
) -> dict[str, list[float]]:
    """Seconds per step of each arm, interleaved in a random order every round."""
    rng = np.random.default_rng(seed)
    pairs = batches(trainers["ours"], rounds + warmup, rng)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for round_index, (plain, dens) in enumerate(pairs):
        for arm in rng.permutation(arms):
            kind = arm.split("_")[0]
            trainer = trainers[kind]
            items = dens if arm == "ours_dens" else plain
            batch = trainer.collater([item.clone() for item in items])
            began = time.perf_counter()
            if arm == "builtin_dens":
                builtin_dens_step(trainer, batch)
            else:
                train_step(trainer, batch)
            elapsed = time.perf_counter() - began
            if round_index >= warmup:
                times[str(arm)].append(elapsed)
    return times


def transform_cost(trainer: Any, count: int, seed: int) -> dict[str, Any]:
    """Our corruption (draw + apply, Alg. 1 l.7-27) per structure, in µs, on loaded structures."""
    dataset = raw_dataset(trainer)
    rng = np.random.default_rng(seed)
    config = dataset._dens
    dataset.disable_dens()
    indices = rng.choice(len(dataset), min(count, len(dataset)), replace=False).tolist()
    items = [(i, dataset[i]) for i in indices]
    dataset._dens = config
    micros = []
    for i, item in items:
        data = item.clone()
        began = time.perf_counter()
        dataset._dens_corrupt(data, i)
        micros.append((time.perf_counter() - began) * 1e6)
    return common.stats(micros)


def builtin_transform_cost(trainer: Any, plain_items: list[Any], count: int) -> dict[str, Any]:
    """The built-in trainer's corruption of a collated batch of 8, in µs per batch."""
    from fairchem.core.models.equiformer_v2.trainers.dens_trainer import (
        add_gaussian_noise_schedule_to_position,
    )

    params = trainer.denoising_pos_params
    micros = []
    for k in range(count):
        batch = trainer.collater([item.clone() for item in plain_items[k % len(plain_items)]])
        began = time.perf_counter()
        add_gaussian_noise_schedule_to_position(
            batch,
            std_low=params.std_low,
            std_high=params.std_high,
            num_steps=params.num_steps,
            corrupt_ratio=params.corrupt_ratio,
            all_atoms=params.all_atoms,
        )
        micros.append((time.perf_counter() - began) * 1e6)
    return common.stats(micros)


def ratios(times: dict[str, list[float]], reference: str) -> dict[str, Any]:
    """Per-round ratio arm/reference (paired, same batch) and the ratio of medians."""
    out = {}
    base = np.array(times[reference])
    for arm, values in times.items():
        if arm == reference:
            continue
        paired = np.array(values) / base
        out[arm] = {
            "paired": common.stats(paired),
            "paired_difference_seconds": common.stats(np.array(values) - base),
            "ratio_of_medians": float(np.median(values) / np.median(base)),
        }
    return out


def measure(model: str, layers: int, arms: list[str], rounds: int, warmup: int, seed: int) -> dict:
    with common.process_group():
        trainers = make_trainers(model, layers, arms, seed)
        try:
            times = time_arms(trainers, arms, rounds, warmup, seed)
            result: dict[str, Any] = {
                "model": model,
                "layers": layers,
                "rounds": rounds,
                "warmup": warmup,
                "batch_size": BATCH,
                "params": {
                    kind: sum(p.numel() for p in t.model.parameters())
                    for kind, t in trainers.items()
                },
                "step_seconds": {arm: common.stats(v) for arm, v in times.items()},
                "ratios_vs_stock": ratios(times, "stock"),
                "raw_step_seconds": times,
            }
            if "builtin" in trainers:
                p = common.DENS["prob"]
                mix = p * np.median(times["builtin_dens"]) + (1 - p) * np.median(
                    times["builtin_plain"]
                )
                result["builtin_expected_step_seconds"] = float(mix)
                result["ours_dens_over_builtin_expected"] = float(
                    np.median(times["ours_dens"]) / mix
                )
                result["ours_dens_over_builtin_dens"] = float(
                    np.median(times["ours_dens"]) / np.median(times["builtin_dens"])
                )
                ours = np.array(times["ours_dens"])
                mixed = p * np.array(times["builtin_dens"]) + (1 - p) * np.array(
                    times["builtin_plain"]
                )
                result["ours_dens_over_builtin_expected_paired"] = common.stats(ours / mixed)
            if layers == 2:
                cost = transform_cost(trainers["ours"], 1000, seed)
                step = np.median(times["ours_dens"])
                result["transform_us_per_structure"] = cost
                result["transform_share_of_step_percent"] = float(
                    100 * cost["median"] * BATCH * 1e-6 / step
                )
                if "builtin" in trainers:
                    plain = [p for p, _ in batches(trainers["ours"], 20, np.random.default_rng(1))]
                    result["builtin_transform_us_per_batch"] = builtin_transform_cost(
                        trainers["builtin"], plain, 200
                    )
        finally:
            from fairchem_dens.testing import close_datasets

            for trainer in trainers.values():
                close_datasets(trainer)
    return result


def extrapolate(results: list[dict[str, Any]], model: str, layers: int = 12) -> dict | None:
    """The DeNS step ratio at ``layers`` layers from the measured depths: the stock step is
    fitted as α + β·L, and the DeNS extra (one noise-head block, independent of L) is the median
    over depths of the paired per-round difference ours_dens − stock."""
    rows = [r for r in results if r["model"] == model and "ours_dens" in r["ratios_vs_stock"]]
    if len({r["layers"] for r in rows}) < 2:
        return None
    depth = np.array([r["layers"] for r in rows], dtype=float)
    stock = np.array([r["step_seconds"]["stock"]["median"] for r in rows])
    beta, alpha = np.polyfit(depth, stock, 1)
    extra = float(
        np.median(
            [r["ratios_vs_stock"]["ours_dens"]["paired_difference_seconds"]["median"] for r in rows]
        )
    )
    return {
        "layers": layers,
        "stock_seconds_fit": {"alpha": float(alpha), "beta_per_layer": float(beta)},
        "dens_extra_seconds": extra,
        "predicted_ratio": float(1 + extra / (alpha + beta * layers)),
    }


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        "# DeNS training-step overhead (generated by benchmarks/overhead.py)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, no GPU; torch {m['torch']} with "
        f"{meta['threads']} thread(s); fairchem-core {m['fairchem_core']}. Load average before: "
        f"{meta['load_before']}, after: {meta['load_after']} (other jobs may have shared the "
        f"machine). Script wall time: {meta['seconds'] / 60:.1f} min.",
        "",
        f"Batches of {BATCH} training structures of the benchmark data; every arm runs once per "
        "round on the same batch, in random order; medians and IQR over rounds after warm-up.",
        "",
        "| model | layers | arm | step median (ms) | IQR (ms) | ratio vs stock (paired median "
        "[IQR]) | ratio of medians |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for arm, s in r["step_seconds"].items():
            ratio = r["ratios_vs_stock"].get(arm)
            paired = (
                f"{ratio['paired']['median']:.3f} [{ratio['paired']['q1']:.3f}, "
                f"{ratio['paired']['q3']:.3f}]"
                if ratio
                else "1"
            )
            of_medians = f"{ratio['ratio_of_medians']:.3f}" if ratio else "1"
            lines.append(
                f"| {r['model']} | {r['layers']} | {arm} | {s['median'] * 1e3:.1f} | "
                f"{s['iqr'] * 1e3:.1f} | {paired} | {of_medians} |"
            )
    lines.append("")
    for r in results:
        if "transform_us_per_structure" in r:
            t = r["transform_us_per_structure"]
            lines.append(
                f"- {r['model']}: our corruption {t['median']:.0f} µs per structure (IQR "
                f"{t['iqr']:.0f}), {r['transform_share_of_step_percent']:.2f}% of a DeNS step "
                f"for a batch of {BATCH} (run in DataLoader workers, so off the step's path)."
            )
        if "builtin_expected_step_seconds" in r:
            b = r.get("builtin_transform_us_per_batch")
            lines.append(
                f"- {r['model']} L={r['layers']}: built-in expected step (p-weighted) "
                f"{r['builtin_expected_step_seconds'] * 1e3:.1f} ms; ours (DeNS step) / "
                f"built-in expected = {r['ours_dens_over_builtin_expected']:.3f} (paired per "
                f"round: {r['ours_dens_over_builtin_expected_paired']['median']:.3f} [IQR "
                f"{r['ours_dens_over_builtin_expected_paired']['q1']:.3f}, "
                f"{r['ours_dens_over_builtin_expected_paired']['q3']:.3f}]); ours DeNS step /"
                f" built-in DeNS step = {r['ours_dens_over_builtin_dens']:.3f}"
                + (f"; built-in corruption {b['median']:.0f} µs per batch." if b else ".")
            )
    for model, fit in meta.get("extrapolation", {}).items():
        if fit:
            lines.append(
                f"- {model}: stock step ≈ {fit['stock_seconds_fit']['alpha'] * 1e3:.0f} ms + "
                f"{fit['stock_seconds_fit']['beta_per_layer'] * 1e3:.0f} ms × layers; DeNS extra "
                f"(median paired difference over depths) {fit['dens_extra_seconds'] * 1e3:.0f} ms;"
                f" predicted DeNS/stock ratio at {fit['layers']} layers: "
                f"{fit['predicted_ratio']:.3f}."
            )
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    base = [r for r in results if r["layers"] == 2]
    ax = axes[0]
    labels, data = [], []
    for r in base:
        for arm, values in r["raw_step_seconds"].items():
            labels.append(f"{r['model']}\n{arm}")
            data.append(np.array(values) * 1e3)
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7, rotation=30)
    ax.set_ylabel("step time (ms)")
    ax.set_title("Step time per arm (2 layers)")
    ax.grid(alpha=0.3)
    ax = axes[1]
    eqv2 = sorted((r for r in results if r["model"] == "eqv2"), key=lambda r: r["layers"])
    layers = [r["layers"] for r in eqv2]
    ratio = [r["ratios_vs_stock"]["ours_dens"]["paired"]["median"] for r in eqv2]
    ax.plot(layers, ratio, marker="o", label="EquiformerV2: ours DeNS step / stock step")
    escn = sorted((r for r in results if r["model"] == "escn"), key=lambda r: r["layers"])
    ax.plot(
        [r["layers"] for r in escn],
        [r["ratios_vs_stock"]["ours_dens"]["paired"]["median"] for r in escn],
        marker="s",
        label="eSCN: ours DeNS step / stock step",
    )
    for r in eqv2 + escn:  # paired IQR
        q = r["ratios_vs_stock"]["ours_dens"]["paired"]
        ax.plot([r["layers"]] * 2, [q["q1"], q["q3"]], color="gray", alpha=0.5, lw=3)
    ax.axhline(1.074, color="C0", ls=":", label="paper EquiformerV2 (12 layers, GPU): 1.074")
    ax.axhline(1.015, color="C1", ls=":", label="paper eSCN (GPU): 1.015")
    ax.set_xlabel("backbone layers")
    ax.set_ylabel("step-time ratio (paired median)")
    ax.set_title("DeNS step overhead vs depth")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="measured rounds (2 layers)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, nargs="*", default=[4, 8], help="scaling section")
    parser.add_argument(
        "--scaling-rounds", type=int, default=None, help="rounds per depth (default rounds/2)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common.ensure_data()
    load_before = common.load_average()
    machine = common.machine()
    began = time.perf_counter()
    results = []
    eqv2_arms = ["stock", "ours_plain", "ours_dens", "builtin_plain", "builtin_dens"]
    plan = [("eqv2", 2, eqv2_arms, args.rounds)]
    plan.append(("escn", 2, ["stock", "ours_plain", "ours_dens"], args.rounds))
    deep = args.scaling_rounds or max(args.rounds // 2, 5)
    for model in ("eqv2", "escn"):
        plan += [(model, n, ["stock", "ours_dens"], deep) for n in args.layers]
    for model, layers, arms, rounds in plan:
        print(f"{model} L={layers}: {arms}, {rounds} rounds", flush=True)
        result = measure(model, layers, arms, rounds, args.warmup, args.seed)
        for arm, ratio in result["ratios_vs_stock"].items():
            print(f"  {arm}/stock: {ratio['paired']['median']:.3f}", flush=True)
        results.append(result)
    meta = {
        "code": CODE,
        "machine": machine,
        "threads": args.threads,
        "load_before": load_before,
        "load_after": common.load_average(),
        "seconds": time.perf_counter() - began,
        "dens": common.DENS,
        "command": " ".join(["benchmarks/overhead.py", *sys.argv[1:]]),
        "extrapolation": {model: extrapolate(results, model) for model in ("eqv2", "escn")},
    }
    common.write_json(common.RESULTS / "overhead.json", {"meta": meta, "results": results})
    (common.RESULTS / "overhead.md").write_text(markdown(results, meta))
    plot(results, common.RESULTS / "overhead.png")
    print((common.RESULTS / "overhead.md").read_text())


if __name__ == "__main__":
    main()
