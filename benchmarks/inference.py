"""Inference overhead of a DeNS model: ours vs the parent vs fairchem 1.10's built-in DeNS model.

One command (from the repository root)::

    .venv/bin/python benchmarks/inference.py           # ~4 min on one CPU thread

The parent model (fairchem's EquiformerV2 / eSCN backbone and heads), our DeNS model (DeNS
backbone + noise head) and fairchem's built-in DeNS model (``equiformer_v2_dens_backbone`` +
``eqV2_DeNS_*`` heads, whose noise block runs on every forward and is multiplied by zero) get the
same weights (every parameter the parent has; the extra DeNS parameters keep their
initialisation) and take turns, in a random order, on the same validation batches of 32 frames.
Timed is the model forward as ``predict`` runs it (eval mode, ``torch.no_grad``). The outputs of
ours and the parent are compared too: they must be identical.

Writes ``benchmarks/results/inference.{json,md}``.
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

EVAL_BATCH = 32
#: parent parameter name -> built-in DeNS model parameter name (its heads rename the blocks).
BUILTIN_RENAMES = {
    "output_heads.energy.energy_block.": "output_heads.energy.scalar_block.",
    "output_heads.forces.force_block.": "output_heads.forces.vector_block.",
}


def build(kind: str, model: str) -> torch.nn.Module:
    """A HydraModel of one kind (``stock``, ``dens`` = ours, ``builtin``) in eval mode."""
    from fairchem.core.models.base import HydraModel

    config = common.variant_config(kind, common.ensure_data(), model=model)["model"]
    hydra = HydraModel(
        backbone=config["backbone"],
        heads=config["heads"],
        otf_graph=True,
        pass_through_head_outputs=True,
    )
    return hydra.eval()


def copy_parent_weights(parent: torch.nn.Module, child: torch.nn.Module, renames: dict) -> int:
    """Load every parent parameter into ``child`` (renamed where needed); returns the count."""
    state = {}
    for name, value in parent.state_dict().items():
        for old, new in renames.items():
            name = name.replace(old, new)
        state[name] = value
    missing_in_child = set(state) - set(child.state_dict())
    if missing_in_child:
        raise KeyError(f"parent weights without a place in the child: {sorted(missing_in_child)}")
    child.load_state_dict(state, strict=False)
    return len(state)


def val_batches(model: str) -> list[Any]:
    from fairchem.core.datasets import data_list_collater
    from fairchem.core.datasets.lmdb_dataset import LmdbDataset

    data = common.ensure_data()
    dataset = LmdbDataset({"src": str(data / "val"), "key_mapping": {"y": "energy"}})
    items = [dataset[i] for i in range(len(dataset))]
    for env in getattr(dataset, "envs", []):
        env.close()
    return [
        data_list_collater(items[i : i + EVAL_BATCH], otf_graph=True)
        for i in range(0, len(items), EVAL_BATCH)
    ]


def measure(
    model: str, passes: int, warmup: int, seed: int, max_batches: int | None = None
) -> dict[str, Any]:
    torch.manual_seed(seed)
    models = {"stock": build("stock", model), "ours": build("dens", model)}
    copied = {"ours": copy_parent_weights(models["stock"], models["ours"], {})}
    if model == "eqv2":
        models["builtin"] = build("builtin", model)
        copied["builtin"] = copy_parent_weights(models["stock"], models["builtin"], BUILTIN_RENAMES)
    batches = val_batches(model)[:max_batches]
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {name: [] for name in models}
    max_diff: dict[str, dict[str, float]] = {name: {} for name in models if name != "stock"}
    rounds = [(p, b) for p in range(passes + 1) for b in range(len(batches))]
    rounds = rounds[len(batches) - warmup :]  # warm-up: the last `warmup` batches of pass 0
    with torch.no_grad():
        for index, (_, b) in enumerate(rounds):
            outputs = {}
            for name in rng.permutation(list(models)):
                batch = batches[b].clone()
                torch.manual_seed(index)  # EquiformerV2/eSCN draw random edge rotations
                began = time.perf_counter()
                out = models[name](batch)
                elapsed = time.perf_counter() - began
                if index >= warmup:
                    times[str(name)].append(elapsed)
                outputs[str(name)] = out
            for name in max_diff:
                for key in ("energy", "forces"):
                    diff = (outputs[name][key] - outputs["stock"][key]).abs().max().item()
                    max_diff[name][key] = max(max_diff[name].get(key, 0.0), diff)
    base = np.array(times["stock"])
    return {
        "model": model,
        "batches": len(batches),
        "eval_batch_size": EVAL_BATCH,
        "measured_forwards_per_model": len(base),
        "params": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
        "parent_tensors_copied": copied,
        "forward_seconds": {name: common.stats(v) for name, v in times.items()},
        "ratio_vs_stock": {
            name: {
                "paired": common.stats(np.array(v) / base),
                "ratio_of_medians": float(np.median(v) / np.median(base)),
            }
            for name, v in times.items()
            if name != "stock"
        },
        "max_abs_output_diff_vs_stock": max_diff,
    }


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        "# Inference overhead of DeNS models (generated by benchmarks/inference.py)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, no GPU; torch {m['torch']} with "
        f"{meta['threads']} thread(s). Load average before: {meta['load_before']}, after: "
        f"{meta['load_after']} (other jobs may have shared the machine). Wall time: "
        f"{meta['seconds'] / 60:.1f} min.",
        "",
        f"Forward passes (eval, no_grad) on the {results[0]['batches']} validation batches of "
        f"{EVAL_BATCH} frames, models interleaved in random order; same parent weights in all.",
        "",
        "| model | kind | forward median (ms) | IQR (ms) | ratio vs parent (paired median "
        "[IQR]) | ratio of medians | max abs Δ energy / forces vs parent |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"stock": "parent (fairchem)", "ours": "ours (DeNS)", "builtin": "fairchem built-in"}
    for r in results:
        for name, s in r["forward_seconds"].items():
            ratio = r["ratio_vs_stock"].get(name)
            paired = (
                f"{ratio['paired']['median']:.3f} [{ratio['paired']['q1']:.3f}, "
                f"{ratio['paired']['q3']:.3f}]"
                if ratio
                else "1"
            )
            diff = r["max_abs_output_diff_vs_stock"].get(name)
            diff_text = f"{diff['energy']:.2g} / {diff['forces']:.2g}" if diff else "–"
            of_medians = f"{ratio['ratio_of_medians']:.3f}" if ratio else "1"
            lines.append(
                f"| {r['model']} | {names[name]} | {s['median'] * 1e3:.1f} | "
                f"{s['iqr'] * 1e3:.1f} | {paired} | {of_medians} | {diff_text} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=2, help="passes over the val batches")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batches", type=int, default=None, help="quick runs")
    args = parser.parse_args()
    from fairchem.core.common.utils import setup_imports

    setup_imports()
    torch.set_num_threads(args.threads)
    load_before = common.load_average()
    machine = common.machine()
    began = time.perf_counter()
    results = []
    for model in ("eqv2", "escn"):
        print(f"{model} ...", flush=True)
        results.append(measure(model, args.passes, args.warmup, args.seed, args.max_batches))
    meta = {
        "code": CODE,
        "machine": machine,
        "threads": args.threads,
        "load_before": load_before,
        "load_after": common.load_average(),
        "seconds": time.perf_counter() - began,
        "command": " ".join(["benchmarks/inference.py", *sys.argv[1:]]),
    }
    common.write_json(common.RESULTS / "inference.json", {"meta": meta, "results": results})
    (common.RESULTS / "inference.md").write_text(markdown(results, meta))
    print((common.RESULTS / "inference.md").read_text())


if __name__ == "__main__":
    main()
