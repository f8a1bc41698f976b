"""Command line interface of ``python -m fairchem_dens.data`` (argparse).

``python -m fairchem_dens.data [SUBCOMMAND] ...``: the first argument picks a generator from
:data:`SUBCOMMANDS`; without one, the EMT slab generator runs (``--out DIR ...``, as before the
subcommands existed). Every invalid argument ends the program with exit status 2 and a single line
on stderr, ``fairchem_dens.data: error: ...``, never a traceback.

Adding a generator: write a module with ``main(argv: list[str]) -> int`` (build its parser with
:class:`OneLineParser` and the argument types below) and add one line to :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from .options import (
    DEFAULT_FMAX,
    DEFAULT_MAX_FORCE,
    DEFAULT_MAX_STEPS,
    DEFAULT_METALS,
    DEFAULT_SYSTEMS,
    DEFAULT_TEST_FRAC,
    DEFAULT_VAL_FRAC,
    EMT_METALS,
    check_writable,
    parse_metals,
    split_counts,
)

PROG = "fairchem_dens.data"

#: Subcommands: name -> ("module:function" taking the remaining argv and returning the exit
#: status, one-line description for ``--help``). Modules are imported only when chosen.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "emt": ("fairchem_dens.data.cli:emt_main", "OC20/OC22-style slabs from EMT (the default)"),
    "bulk": ("fairchem_dens.data.bulk:main", "EMT bulk cells with stress as .aselmdb (ase_db)"),
    "molecules": (
        "fairchem_dens.data.cli_molecules:main",
        "MD17-style molecules from GFN2-xTB Langevin MD",
    ),
}


class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line, ``fairchem_dens.data: error: ...`` (no usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {' '.join(message.split())}\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (defaults shown with ``--help``)."""
    p = OneLineParser(
        prog=PROG,
        description="Generate small OC20/OC22-format S2EF + IS2RE LMDBs from ASE EMT BFGS "
        "relaxations of adsorbates on fcc(111)/fcc(100) slabs.",
        epilog="other generators: "
        + "; ".join(f"{PROG} {name} --help: {desc}" for name, (_, desc) in SUBCOMMANDS.items()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output root directory")
    p.add_argument("--variant", choices=("oc20", "oc22", "both"), default="both")
    p.add_argument(
        "--systems",
        type=positive_int,
        default=DEFAULT_SYSTEMS,
        help="relaxation trajectories (systems) per variant",
    )
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument(
        "--max-steps",
        type=positive_int,
        default=DEFAULT_MAX_STEPS,
        help="max BFGS steps per system (frames <= max-steps + 1)",
    )
    p.add_argument(
        "--max-force",
        type=positive_float,
        default=DEFAULT_MAX_FORCE,
        help="drop frames whose largest per-atom force norm exceeds this (eV/A)",
    )
    p.add_argument(
        "--fmax",
        type=positive_float,
        default=DEFAULT_FMAX,
        help="BFGS convergence threshold (eV/A)",
    )
    p.add_argument(
        "--metals",
        default=",".join(DEFAULT_METALS),
        help=f"comma-separated slab metals, from {','.join(EMT_METALS)}",
    )
    p.add_argument("--val-frac", type=_fraction, default=DEFAULT_VAL_FRAC)
    p.add_argument("--test-frac", type=_fraction, default=DEFAULT_TEST_FRAC)
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="worker processes (output does not depend on it)",
    )
    p.add_argument(
        "--frames-per-system-max",
        type=positive_int,
        default=None,
        help="keep at most this many evenly spaced frames per trajectory",
    )
    return p


def subcommand(name: str) -> Callable[[list[str]], int]:
    """The ``main`` function of subcommand ``name`` (imports its module)."""
    module, func = SUBCOMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand (first argument) or, without one, the EMT generator."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return subcommand(argv[0])(argv[1:])
    return emt_main(argv)


def emt_main(argv: list[str] | None = None) -> int:
    """EMT slabs: parse arguments, generate the datasets, print a summary. Returns exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Validate everything cheap before importing torch/ASE, with the CLI flag names.
    try:
        parse_metals(args.metals)
    except ValueError as err:
        parser.error(f"argument --metals: {err}")
    try:
        split_counts(args.systems, args.val_frac, args.test_frac)
    except ValueError:
        parser.error(
            f"arguments --val-frac {args.val_frac:g} --test-frac {args.test_frac:g} leave no "
            f"train systems out of --systems {args.systems}"
        )
    try:
        check_writable(args.out)
    except ValueError as err:
        parser.error(f"argument --out: {err}")

    from .generator import generate

    try:
        summary = generate(
            out=args.out,
            variant=args.variant,
            systems=args.systems,
            seed=args.seed,
            max_steps=args.max_steps,
            max_force=args.max_force,
            metals=args.metals,
            val_frac=args.val_frac,
            test_frac=args.test_frac,
            workers=args.workers,
            frames_per_system_max=args.frames_per_system_max,
            fmax=args.fmax,
        )
    except ValueError as err:
        parser.error(str(err))
    except OSError as err:
        parser.error(f"cannot write output: {err}")
    for variant in ("oc20", "oc22"):
        if variant not in summary:
            continue
        s = summary[variant]
        fr, sy = s["frames"], s["systems"]
        print(
            f"{variant}: {args.systems} systems ({s['converged']} converged), frames "
            f"train {fr['train']} ({sy['train']} sys) / val {fr['val']} ({sy['val']} sys) / "
            f"test {fr['test']} ({sy['test']} sys), is2re {fr['is2re']}; dropped "
            f"{s['dropped']} frames with max |F| > {args.max_force:g} eV/A"
            + (f", subsampled out {s['subsampled_out']}" if s["subsampled_out"] else "")
        )
    print(f"wrote {args.out} in {summary['time_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
