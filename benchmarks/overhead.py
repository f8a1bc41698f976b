"""Training-step overhead of DeNS: ours vs the parent (no DeNS) vs fairchem 1.10's built-in DeNS,
for several p_DeNS / r_DeNS, with the noise head on corrupted atoms only (after) or on every atom
(before).

One command (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/overhead.py    # ~10 min on an idle CPU

All trainers of one model size live in one process (one gloo group, as the CLI sets up) and take
turns on the same 8 training structures: each round draws one batch and runs every arm once on it,
in a random order, after warm-up rounds. A step is what fairchem's training loop does per batch:
forward, loss, training metrics, backward, gradient clipping, optimizer and EMA update.

Units (model, layers): EquiformerV2 at 2 and 4 layers, eSCN at 2 layers. Arms of a unit:

* ``stock``: fairchem's own backbone/heads and trainer — the parent;
* ``ours_plain``: ``DeNSTrainer`` + DeNS model on the batch without DeNS fields;
* ``after@p,r`` / ``before@p,r``: the same trainer and model on the batch corrupted with
  p_DeNS = p, r_DeNS = r (σ_high 0.5, free atoms), with the noise head computing only corrupted
  atoms (``only_corrupted=True``, the default) or every atom (``False``, the previous head); the
  two share the trainer, the weights and the batch, and differ only in that switch;
* ``builtin_plain`` / ``builtin_dens`` (EquiformerV2 only): fairchem's ``equiformerv2_dens``
  trainer and model on a batch it does not corrupt / corrupts itself (its transform runs in its
  training loop, so it is timed). It decides DeNS once per batch with probability p and always
  runs its noise block on every atom, so its expected step at p is
  ``p · builtin_dens + (1 − p) · builtin_plain``.

Step times are the process's CPU time (``time.process_time``: it does not advance while the
process waits for a core, so it resists the load of other jobs on a shared machine) and wall time;
ratios are medians of per-round (paired) ratios.

After all timed rounds, a memory stage (fresh trainers, one warm-up round, then untimed rounds)
measures per arm the activations autograd saves for backward (exact, from
``saved_tensors_hooks``) and the rise of the process's resident set during the step (VmHWM reset
through ``/proc/self/clear_refs``, freed heap returned by ``malloc_trim``, blocks ≥ 64 KiB served
by mmap so that freed tensors leave the resident set).

Our corruption runs in the dataset's ``__getitem__`` (DataLoader workers), so it is not in a step;
its cost per structure is timed separately and reported as a share of a step.

Resumable: each unit's result is kept in ``runs/bench/overhead/units/`` and skipped on a rerun
(``--fresh`` starts over). Writes ``benchmarks/results/overhead.{json,md}`` and ``overhead.png``
(``--output`` names another stem).

eSEN with gradient forces (issue 15; ``--units esen:2 --output overhead_esen``): no built-in
arms; one more arm per setting, ``head@p,r``, times the noise head alone (forward and backward
on the final node embeddings of the same batch, computed outside the timer) for the target
DeNS step / plain step ≤ 1 + (share of the noise head) + 0.02.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

CODE = common.pin_code()  # before anything imports fairchem_dens

BATCH = 8
#: (p_DeNS, r_DeNS) settings: the paper's p for OC20-2M (0.5), MD17 (0.25), All+MD (0.125).
SETTINGS = [(p, r) for p in (0.125, 0.25, 0.5) for r in (0.25, 1.0)]
UNITS_DIR = common.RUNS / "overhead" / "units"


def setting_arm(kind: str, p: float, r: float) -> str:
    return f"{kind}@p={p:g},r={r:g}"


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


def make_trainers(model: str, layers: int, builtin: bool, seed: int) -> dict[str, Any]:
    """One trainer per kind (stock, ours, built-in), each on its own copy of the benchmark data."""
    kinds = {"stock": "stock", "ours": "dens"}
    if builtin:
        kinds["builtin"] = "builtin"
    trainers = {}
    for kind, variant in kinds.items():
        data = common.data_copy(kind)
        config = common.variant_config(variant, data, model=model)
        config["model"]["backbone"]["num_layers"] = layers
        config["logger"] = "tensorboard"
        run_dir = common.RUNS / "overhead" / f"{model}_L{layers}_{kind}"
        trainers[kind] = common.build_trainer(config, run_dir, seed)
    trainers["ours"].enable_dens_on_train_data()
    return trainers


def raw_dataset(trainer: Any) -> Any:
    """The LMDB dataset under fairchem's Subset wrappers."""
    dataset = trainer.train_dataset
    while not hasattr(dataset, "path"):
        dataset = dataset.dataset
    return dataset


def batches(trainer: Any, rounds: int, rng: np.random.Generator) -> list[dict[str, list]]:
    """``rounds`` draws of ``BATCH`` structures: ``plain`` (no DeNS fields) and, per setting
    (p, r), the same structures with DeNS fields drawn with that setting."""
    dataset = raw_dataset(trainer)
    config = dataset._dens
    out = []
    for _ in range(rounds):
        indices = rng.choice(len(dataset), BATCH, replace=False).tolist()
        dataset.disable_dens()
        items = {"plain": [dataset[i] for i in indices]}
        for p, r in SETTINGS:
            # enable_dens kept the seed and normaliser; only p and r change
            dataset._dens = dataclasses.replace(config, prob=p, corrupt_ratio=r)
            items[f"p={p:g},r={r:g}"] = [dataset[i] for i in indices]
        dataset._dens = config
        out.append(items)
    return out


def arms_of(builtin: bool, head: bool = False) -> list[str]:
    arms = ["stock", "ours_plain"]
    for p, r in SETTINGS:
        arms += [setting_arm("after", p, r), setting_arm("before", p, r)]
        if head:
            arms.append(setting_arm("head", p, r))
    if builtin:
        arms += ["builtin_plain", "builtin_dens"]
    return arms


def head_step(trainer: Any, batch: Any) -> tuple[float, float]:
    """The noise head alone (forward and backward, corrupted atoms only) on the final node
    embeddings of ``batch``, which are computed outside the timer; (wall, CPU) seconds. Its share
    of a step is the budget of issue 15's target (DeNS step / plain step ≤ 1 + share + 0.02)."""
    from fairchem_dens import keys

    model = trainer._unwrapped_model
    head = model.output_heads["dens_noise"]
    head.only_corrupted = True
    model.train()
    embedding = model.backbone(batch)["node_embedding"].detach().requires_grad_()
    wall, cpu = time.perf_counter(), time.process_time()
    noise = head(batch, {"node_embedding": embedding})[keys.NOISE_OUTPUT]
    noise.square().sum().backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_arm(trainers: dict[str, Any], arm: str, items: dict[str, list]) -> tuple[float, float]:
    """Run one arm's step on its version of the round's batch; (wall, CPU) seconds."""
    if arm in ("stock", "ours_plain", "builtin_plain", "builtin_dens"):
        trainer = trainers[arm.split("_")[0]]
        structures = items["plain"]
    elif arm.startswith("head@"):
        trainer = trainers["ours"]
        return head_step(trainer, trainer.collater([i.clone() for i in items[arm.split("@")[1]]]))
    else:
        kind, setting = arm.split("@")
        trainer = trainers["ours"]
        trainer._unwrapped_model.output_heads["dens_noise"].only_corrupted = kind == "after"
        structures = items[setting]
    batch = trainer.collater([item.clone() for item in structures])
    wall, cpu = time.perf_counter(), time.process_time()
    if arm == "builtin_dens":
        builtin_dens_step(trainer, batch)
    else:
        train_step(trainer, batch)
    return time.perf_counter() - wall, time.process_time() - cpu


def time_arms(
    trainers: dict[str, Any], arms: list[str], draws: list[dict], warmup: int, seed: int
) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per step of each arm, interleaved in a random order every round."""
    rng = np.random.default_rng(seed)
    times: dict[str, dict[str, list[float]]] = {
        clock: {arm: [] for arm in arms} for clock in CLOCKS
    }
    for round_index, items in enumerate(draws):
        for arm in rng.permutation(arms):
            wall, cpu = run_arm(trainers, str(arm), items)
            if round_index >= warmup:
                times["wall"][str(arm)].append(wall)
                times["cpu"][str(arm)].append(cpu)
    return times


#: CPU time of the process (load-robust: it does not advance while the process waits for a
#: core) and wall time.
CLOCKS = ("cpu", "wall")
_LIBC = ctypes.CDLL("libc.so.6")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class SavedActivations:
    """Bytes of the distinct tensor storages autograd saves for backward during a step (what a
    training step keeps alive between forward and backward), parameters excluded."""

    def __init__(self, parameters: list[torch.Tensor]) -> None:
        self.parameters = {p.untyped_storage().data_ptr() for p in parameters}
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameters:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20


def memory_of_arms(
    trainers: dict[str, Any], arms: list[str], draws: list[dict], seed: int
) -> dict[str, dict[str, float]]:
    """Per arm: the step's peak resident set above its start (median over ``draws``, MiB), the
    process's largest peak resident set (MiB) and the activations saved for backward (median,
    MiB). The first draw warms every arm up (optimizer state) and is not counted.

    Call after :func:`use_mmap_for_large_blocks`, so freed tensors leave the resident set."""
    rng = np.random.default_rng(seed + 1)
    found: dict[str, dict[str, list[float]]] = {
        arm: {"rise": [], "peak": [], "saved": []} for arm in arms
    }
    for round_index, items in enumerate(draws):
        for arm in rng.permutation(arms):
            arm = str(arm)
            kind = "ours" if "@" in arm else arm.split("_")[0]
            saved = SavedActivations(list(trainers[kind].model.parameters()))
            gc.collect()
            _LIBC.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            start = _status_kib("VmRSS")
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
                run_arm(trainers, arm, items)
            peak = _status_kib("VmHWM")
            if round_index > 0:
                found[arm]["rise"].append((peak - start) / 1024)
                found[arm]["peak"].append(peak / 1024)
                found[arm]["saved"].append(saved.mib)
    return {
        arm: {
            "step_rise_mib": float(np.median(v["rise"])),
            "peak_rss_mib": float(max(v["peak"])),
            "saved_activations_mib": float(np.median(v["saved"])),
        }
        for arm, v in found.items()
    }


def use_mmap_for_large_blocks() -> None:
    """Serve every block ≥ 64 KiB by its own mmap and trim the heap eagerly (glibc), so a freed
    tensor leaves the resident set at once and VmHWM tracks the live tensors. Changes the cost of
    allocation, so it is set only for the memory stage, after every timed round."""
    _LIBC.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    _LIBC.mallopt(_M_TRIM_THRESHOLD, 64 * 1024)


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


def paired(values: list[float], base: list[float]) -> dict[str, Any]:
    """Per-round ratio values/base (same batch) with a bootstrap 90 % interval of its median,
    the paired difference, the ratio of medians."""
    values, base = np.array(values), np.array(base)
    ratio = values / base
    resampled = np.random.default_rng(0).choice(ratio, (2000, ratio.size), replace=True)
    low, high = np.percentile(np.median(resampled, axis=1), [5, 95])
    return {
        "paired": {**common.stats(ratio), "ci90_low": float(low), "ci90_high": float(high)},
        "paired_difference_seconds": common.stats(values - base),
        "ratio_of_medians": float(np.median(values) / np.median(base)),
    }


def summarise(times: dict[str, list[float]], builtin: bool) -> dict[str, Any]:
    """Ratios of every setting: vs stock (after, before), after vs before, vs the built-in."""
    rows = {}
    for p, r in SETTINGS:
        after, before = times[setting_arm("after", p, r)], times[setting_arm("before", p, r)]
        row: dict[str, Any] = {
            "p": p,
            "r": r,
            "after_vs_stock": paired(after, times["stock"]),
            "before_vs_stock": paired(before, times["stock"]),
            "after_vs_before": paired(after, before),
            "after_vs_ours_plain": paired(after, times["ours_plain"]),
        }
        if setting_arm("head", p, r) in times:  # the noise head's share of a stock step
            row["head_vs_stock"] = paired(times[setting_arm("head", p, r)], times["stock"])
        if builtin:
            expected = p * np.array(times["builtin_dens"]) + (1 - p) * np.array(
                times["builtin_plain"]
            )
            row["after_vs_builtin_expected"] = paired(after, list(expected))
            row["after_vs_builtin_dens"] = paired(after, times["builtin_dens"])
            row["before_vs_builtin_expected"] = paired(before, list(expected))
        rows[f"p={p:g},r={r:g}"] = row
    return {
        "step_seconds": {arm: common.stats(v) for arm, v in times.items()},
        "ours_plain_vs_stock": paired(times["ours_plain"], times["stock"]),
        "settings": rows,
    }


def corrupted_fractions(draws: list[dict]) -> dict[str, dict[str, float]]:
    """Mean fraction of DeNS structures and of corrupted atoms per setting over the draws."""
    from fairchem_dens import keys

    out = {}
    for p, r in SETTINGS:
        name = f"p={p:g},r={r:g}"
        structures = [
            float(item[keys.DENS_STRUCTURE].float().mean()) for d in draws for item in d[name]
        ]
        atoms = torch.cat([item[keys.DENS_MASK] for d in draws for item in d[name]]).float()
        out[name] = {"structures": float(np.mean(structures)), "atoms": float(atoms.mean())}
    return out


def measure(model: str, layers: int, rounds: int, warmup: int, seed: int) -> dict[str, Any]:
    """The timed rounds of one unit."""
    builtin = model == "eqv2"
    arms = arms_of(builtin, head=model == "esen")
    load_before = common.load_average()
    began = time.perf_counter()
    with common.process_group():
        trainers = make_trainers(model, layers, builtin, seed)
        try:
            rng = np.random.default_rng(seed)
            draws = batches(trainers["ours"], rounds + warmup, rng)
            times = time_arms(trainers, arms, draws, warmup, seed)
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
                "corrupted_fractions": corrupted_fractions(draws[warmup:]),
                "clocks": {clock: summarise(times[clock], builtin) for clock in CLOCKS},
                "raw_step_seconds": times,
            }
            if layers == 2:
                cost = transform_cost(trainers["ours"], 1000, seed)
                step = np.median(times["wall"][setting_arm("after", 0.5, 1.0)])
                result["transform_us_per_structure"] = cost
                result["transform_share_of_step_percent"] = float(
                    100 * cost["median"] * BATCH * 1e-6 / step
                )
        finally:
            from fairchem_dens.testing import close_datasets

            for trainer in trainers.values():
                close_datasets(trainer)
    result["load_before"] = load_before
    result["load_after"] = common.load_average()
    result["seconds"] = time.perf_counter() - began
    return result


def measure_memory(model: str, layers: int, rounds: int, seed: int) -> dict[str, Any]:
    """The memory rounds of one unit (after one warm-up round)."""
    builtin = model == "eqv2"
    load_before = common.load_average()
    began = time.perf_counter()
    with common.process_group():
        trainers = make_trainers(model, layers, builtin, seed)
        try:
            draws = batches(trainers["ours"], rounds + 1, np.random.default_rng(seed + 1))
            memory = memory_of_arms(trainers, arms_of(builtin), draws, seed)
        finally:
            from fairchem_dens.testing import close_datasets

            for trainer in trainers.values():
                close_datasets(trainer)
    return {
        "model": model,
        "layers": layers,
        "memory_rounds": rounds,
        "arms": memory,
        "load_before": load_before,
        "load_after": common.load_average(),
        "seconds": time.perf_counter() - began,
    }


def extrapolate(
    results: list[dict[str, Any]], model: str, clock: str = "cpu", layers: int = 12
) -> dict | None:
    """DeNS step / stock step at ``layers`` layers from the measured depths, per setting: the
    stock step is fitted as α + β·L, and the DeNS extra (the noise head and force encoding,
    independent of L) is the mean over depths of the median paired difference arm − stock."""
    rows = sorted((r for r in results if r["model"] == model), key=lambda r: r["layers"])
    if len({r["layers"] for r in rows}) < 2:
        return None
    depth = np.array([r["layers"] for r in rows], dtype=float)
    stock = np.array([r["clocks"][clock]["step_seconds"]["stock"]["median"] for r in rows])
    beta, alpha = np.polyfit(depth, stock, 1)
    out: dict[str, Any] = {
        "clock": clock,
        "layers": layers,
        "stock_seconds_fit": {"alpha": float(alpha), "beta_per_layer": float(beta)},
        "settings": {},
    }
    for name in rows[0]["clocks"][clock]["settings"]:
        for kind in ("after", "before"):
            extra = float(
                np.mean(
                    [
                        r["clocks"][clock]["settings"][name][f"{kind}_vs_stock"][
                            "paired_difference_seconds"
                        ]["median"]
                        for r in rows
                    ]
                )
            )
            out["settings"].setdefault(name, {})[kind] = {
                "extra_seconds": extra,
                "predicted_ratio": float(1 + extra / (alpha + beta * layers)),
            }
    return out


def _q(stats: dict[str, Any]) -> str:
    """Paired median ratio with its bootstrap 90 % interval."""
    s = stats["paired"]
    return f"{s['median']:.3f} ({s['ci90_low']:.2f}–{s['ci90_high']:.2f})"


NAMES = {"eqv2": "EquiformerV2", "escn": "eSCN", "esen": "eSEN (gradient forces)"}


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        "# DeNS training-step overhead (generated by benchmarks/overhead.py)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, no GPU lent to this task; torch {m['torch']} "
        f"with {meta['threads']} thread(s); fairchem-core {m['fairchem_core']}. Other jobs shared "
        "the machine; load averages (1/5/15 min) are given per unit. Script time (all stages): "
        f"{meta['seconds'] / 60:.1f} min. Command: `{meta['command']}`.",
        "",
        f"Batches of {BATCH} training structures of the benchmark data; every arm runs once per "
        "round on the same batch, in random order. Ratios are medians (bootstrap 90 % interval of "
        "the median) of per-round (paired) "
        "ratios of the process's **CPU time** per step (it does not advance while the process "
        "waits for a core, so it resists the load of other jobs); the wall-time ratio is given "
        "too. *after*: noise head on corrupted atoms only (default); *before*: on every atom "
        "(the previous head; same trainer, weights and batch). *built-in*: the p-weighted mix "
        "of its DeNS and plain steps (it runs its noise block on every atom of every step). "
        "Memory (separate untimed rounds): activations saved for backward (MiB, exact), and the "
        "rise of the resident set during the step (MiB, glibc serving blocks ≥ 64 KiB by mmap).",
        "",
    ]
    for r in results:
        name = f"{NAMES[r['model']]}, {r['layers']} layers"
        cpu, wall = r["clocks"]["cpu"], r["clocks"]["wall"]
        steps = cpu["step_seconds"]
        mem = r.get("memory")
        lines += [
            f"## {name}",
            "",
            f"{r['rounds']} timed rounds after {r['warmup']} warm-up; {r['seconds'] / 60:.1f} min; "
            f"load average before {r['load_before']}, after {r['load_after']}. Stock step "
            f"{steps['stock']['median'] * 1e3:.0f} ms CPU (IQR {steps['stock']['iqr'] * 1e3:.0f}),"
            f" {wall['step_seconds']['stock']['median'] * 1e3:.0f} ms wall; ours without DeNS "
            f"fields / stock {_q(cpu['ours_plain_vs_stock'])}"
            + (
                f"; built-in plain / DeNS step {steps['builtin_plain']['median'] * 1e3:.0f} / "
                f"{steps['builtin_dens']['median'] * 1e3:.0f} ms CPU."
                if "builtin_dens" in steps
                else "."
            ),
            "",
        ]
        builtin = "builtin_dens" in steps
        header = (
            "| p_DeNS | r_DeNS | corrupted atoms | after / stock | before / stock | after / before "
            "| after / ours without DeNS | extra after / before (ms) | after / stock, wall |"
        )
        rule = "|---|---|---|---|---|---|---|---|---|"
        if builtin:
            header += " after / built-in | after / built-in DeNS step |"
            rule += "---|---|"
        if mem:
            header += " saved activations after / before (MiB) | RSS rise after / before (MiB) |"
            rule += "---|---|"
        lines += [header, rule]
        for setting, row in cpu["settings"].items():
            extra_after = row["after_vs_stock"]["paired_difference_seconds"]["median"] * 1e3
            extra_before = row["before_vs_stock"]["paired_difference_seconds"]["median"] * 1e3
            line = (
                f"| {row['p']:g} | {row['r']:g} | "
                f"{100 * r['corrupted_fractions'][setting]['atoms']:.1f} % | "
                f"**{_q(row['after_vs_stock'])}** | {_q(row['before_vs_stock'])} | "
                f"{_q(row['after_vs_before'])} | {_q(row['after_vs_ours_plain'])} | "
                f"{extra_after:+.0f} / {extra_before:+.0f} | "
                f"{_q(wall['settings'][setting]['after_vs_stock'])} |"
            )
            if builtin:
                line += (
                    f" **{_q(row['after_vs_builtin_expected'])}** | "
                    f"{_q(row['after_vs_builtin_dens'])} |"
                )
            if mem:
                a = mem["arms"][setting_arm("after", row["p"], row["r"])]
                b = mem["arms"][setting_arm("before", row["p"], row["r"])]
                line += (
                    f" {a['saved_activations_mib']:.0f} / {b['saved_activations_mib']:.0f} | "
                    f"{a['step_rise_mib']:.0f} / {b['step_rise_mib']:.0f} |"
                )
            lines.append(line)
        lines.append("")
        shares = {k: v for k, v in cpu["settings"].items() if "head_vs_stock" in v}
        if shares:  # issue 15: DeNS step / plain step ≤ 1 + (share of the noise head) + 0.02
            parts = []
            for setting, row in shares.items():
                share = row["head_vs_stock"]["paired"]["median"]
                ratio = row["after_vs_stock"]["paired"]["median"]
                verdict = "met" if ratio <= 1 + share + 0.02 else "not met"
                parts.append(
                    f"{setting}: head {share:.3f}, after / stock {ratio:.3f} vs bound "
                    f"{1 + share + 0.02:.3f} ({verdict})"
                )
            lines += [
                "Noise head alone (forward + backward on the corrupted atoms' final embeddings, "
                "timed in the same rounds) / stock step, and the bound 1 + share + 0.02 at the "
                "median: " + "; ".join(parts) + ".",
                "",
            ]
        if mem:
            parts = [
                f"{arm} {mem['arms'][arm]['saved_activations_mib']:.0f} / "
                f"{mem['arms'][arm]['step_rise_mib']:.0f}"
                for arm in ("stock", "ours_plain", "builtin_plain", "builtin_dens")
                if arm in mem["arms"]
            ]
            peak = max(v["peak_rss_mib"] for v in mem["arms"].values())
            lines += [
                "Memory of the other arms (saved activations / RSS rise, MiB): "
                + "; ".join(parts)
                + f". Largest process RSS {peak:.0f} MiB ({mem['memory_rounds']} rounds after "
                f"one warm-up; load average {mem['load_before']} → {mem['load_after']}).",
                "",
            ]
        if "transform_us_per_structure" in r:
            t = r["transform_us_per_structure"]
            lines += [
                f"Our corruption: {t['median']:.0f} µs per structure (IQR {t['iqr']:.0f}), "
                f"{r['transform_share_of_step_percent']:.2f} % of a DeNS step (p 0.5, r 1, wall) "
                f"for a batch of {BATCH}; it runs in DataLoader workers, off the step's path.",
                "",
            ]
    for model, fit in meta.get("extrapolation", {}).items():
        if not fit:
            continue
        f = fit["stock_seconds_fit"]
        parts = [
            f"{setting}: {v['after']['predicted_ratio']:.3f} (before "
            f"{v['before']['predicted_ratio']:.3f})"
            for setting, v in fit["settings"].items()
        ]
        lines.append(
            f"- {NAMES[model]} ({fit['clock']} time): stock step ≈ {f['alpha'] * 1e3:.0f} ms + "
            f"{f['beta_per_layer'] * 1e3:.0f} ms × layers; predicted DeNS/stock ratio at "
            f"{fit['layers']} layers (constant extra): " + "; ".join(parts) + "."
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    labels = [f"p={p:g}\nr={r:g}" for p, r in SETTINGS]
    x = np.arange(len(SETTINGS))
    width = 0.8 / (2 * len(results))
    ax = axes[0]
    for k, r in enumerate(results):
        name = f"{NAMES[r['model']]} L{r['layers']}"
        rows = r["clocks"]["cpu"]["settings"].values()
        for j, kind in enumerate(("before", "after")):
            values = [row[f"{kind}_vs_stock"]["paired"] for row in rows]
            offset = (2 * k + j - len(results) + 0.5) * width
            ax.bar(
                x + offset,
                [v["median"] - 1 for v in values],
                width,
                bottom=1,
                color=f"C{k}",
                alpha=0.35 if kind == "before" else 0.9,
                hatch="//" if kind == "before" else None,
                label=f"{name} {kind}",
                yerr=[
                    [v["median"] - v["ci90_low"] for v in values],
                    [v["ci90_high"] - v["median"] for v in values],
                ],
                error_kw={"lw": 0.8},
            )
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("DeNS step / stock step (CPU time, paired median, 90 % CI)")
    ax.set_title("Noise head on every atom (before) vs on corrupted atoms (after)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1]
    for k, r in enumerate(results):
        rows = r["clocks"]["cpu"]["settings"].values()
        if not any("after_vs_builtin_expected" in row for row in rows):
            continue
        for kind, style in (("after", "-o"), ("before", ":s")):
            values = [row[f"{kind}_vs_builtin_expected"]["paired"] for row in rows]
            ax.plot(
                x,
                [v["median"] for v in values],
                style,
                color=f"C{k}",
                label=f"{NAMES[r['model']]} L{r['layers']} {kind}",
            )
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("ours / built-in expected step (CPU time, paired median)")
    ax.set_title("Ours vs fairchem's built-in DeNS (p-weighted mix of its steps)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds at 2 layers")
    parser.add_argument("--deep-rounds", type=int, default=6, help="timed rounds at 4 layers")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-rounds", type=int, default=2, help="0: no memory stage")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="ignore kept unit results")
    parser.add_argument(
        "--output", default="overhead", help="stem of the files written in benchmarks/results/"
    )
    parser.add_argument(
        "--units", nargs="*", default=["eqv2:2", "escn:2", "eqv2:4"], help="model:layers to run"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common.ensure_data()
    machine = common.machine()
    UNITS_DIR.mkdir(parents=True, exist_ok=True)
    plan = []
    for unit in args.units:
        model, layers = unit.split(":")
        plan.append((model, int(layers), args.rounds if int(layers) == 2 else args.deep_rounds))

    def kept(path: Path, **expected: Any) -> dict | None:
        if args.fresh or not path.exists():
            return None
        found = json.loads(path.read_text())
        return found if all(found.get(k) == v for k, v in expected.items()) else None

    results = []
    for model, layers, rounds in plan:  # stage 1: timed rounds
        path = UNITS_DIR / f"{model}_L{layers}.json"
        result = kept(path, rounds=rounds, warmup=args.warmup)
        if result is None:
            print(f"{model} L={layers}: {rounds} timed rounds", flush=True)
            result = measure(model, layers, rounds, args.warmup, args.seed)
            common.write_json(path, result)
        result["clocks"] = {  # summaries from the raw step times (kept units too)
            clock: summarise(result["raw_step_seconds"][clock], model == "eqv2") for clock in CLOCKS
        }
        for setting, row in result["clocks"]["cpu"]["settings"].items():
            print(
                f"  {model} L={layers} {setting}: after/stock "
                f"{row['after_vs_stock']['paired']['median']:.3f}, before/stock "
                f"{row['before_vs_stock']['paired']['median']:.3f} (CPU time)",
                flush=True,
            )
        results.append(result)
    if args.memory_rounds:  # stage 2: memory, after every timed round (allocator settings)
        use_mmap_for_large_blocks()
        for result in results:
            model, layers = result["model"], result["layers"]
            path = UNITS_DIR / f"{model}_L{layers}_memory.json"
            memory = kept(path, memory_rounds=args.memory_rounds)
            if memory is None:
                print(f"{model} L={layers}: {args.memory_rounds} memory rounds", flush=True)
                memory = measure_memory(model, layers, args.memory_rounds, args.seed)
                common.write_json(path, memory)
            result["memory"] = memory
    meta = {
        "code": CODE,
        "machine": machine,
        "threads": args.threads,
        "seconds": float(
            sum(r["seconds"] + r.get("memory", {}).get("seconds", 0.0) for r in results)
        ),
        "dens": common.DENS,
        "settings": SETTINGS,
        "command": " ".join(["benchmarks/overhead.py", *sys.argv[1:]]),
        "extrapolation": {model: extrapolate(results, model) for model in ("eqv2", "escn")},
        "extrapolation_wall": {
            model: extrapolate(results, model, "wall") for model in ("eqv2", "escn")
        },
    }
    stem = common.RESULTS / args.output
    common.write_json(stem.with_suffix(".json"), {"meta": meta, "results": results})
    stem.with_suffix(".md").write_text(markdown(results, meta))
    plot(results, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
