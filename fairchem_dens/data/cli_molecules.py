"""``python -m fairchem_dens.data molecules``: MD17-style molecular datasets (GFN2-xTB MD).

See :mod:`fairchem_dens.data.molecules` for the protocol and ``docs/data.md`` for the layout.
Errors are one line, ``fairchem_dens.data: error: ...``, exit status 2.
"""

from __future__ import annotations

import argparse

from .cli import PROG, OneLineParser, nonneg_int, positive_float, positive_int
from .molecules import (
    DEFAULT_EQUILIBRATION,
    DEFAULT_FRICTION_PER_FS,
    DEFAULT_SPACING,
    DEFAULT_TEMPERATURE,
    DEFAULT_TEST,
    DEFAULT_TIMESTEP_FS,
    DEFAULT_TRAIN,
    DEFAULT_VAL,
    MOLECULES,
    parse_molecules,
    require_backends,
)
from .options import check_writable


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``molecules`` subcommand (defaults shown with ``--help``)."""
    p = OneLineParser(
        prog=f"{PROG} molecules",
        description="Generate MD17-style S2EF LMDBs (one molecule each) from GFN2-xTB Langevin "
        "MD (tblite), started from RDKit geometries; frames split at random into train/val/test.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output root (one folder per molecule)")
    p.add_argument(
        "--molecules",
        nargs="+",
        default=["ethanol"],
        help=f"molecules (or 'all'), from: {', '.join(MOLECULES)}",
    )
    p.add_argument("--train", type=positive_int, default=DEFAULT_TRAIN, help="train frames")
    p.add_argument("--val", type=nonneg_int, default=DEFAULT_VAL, help="val frames")
    p.add_argument("--test", type=nonneg_int, default=DEFAULT_TEST, help="test frames")
    p.add_argument(
        "--temperature", type=positive_float, default=DEFAULT_TEMPERATURE, help="Langevin T (K)"
    )
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument(
        "--spacing", type=positive_int, default=DEFAULT_SPACING, help="MD steps between frames"
    )
    p.add_argument(
        "--timestep", type=positive_float, default=DEFAULT_TIMESTEP_FS, help="MD time step (fs)"
    )
    p.add_argument(
        "--equilibration",
        type=nonneg_int,
        default=DEFAULT_EQUILIBRATION,
        help="MD steps before the first frame",
    )
    p.add_argument(
        "--friction",
        type=positive_float,
        default=DEFAULT_FRICTION_PER_FS,
        help="Langevin friction (1/fs)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="processes, one molecule each (output does not depend on it)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, generate the datasets, print a summary. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    requested = [m for item in args.molecules for m in item.split(",")]
    if any(m.strip().lower() == "all" for m in requested):
        requested = list(MOLECULES)
    try:
        names = parse_molecules(requested)
    except ValueError as err:
        parser.error(f"argument --molecules: {err}")
    try:
        check_writable(args.out)
    except ValueError as err:
        parser.error(f"argument --out: {err}")
    try:
        require_backends()
    except ImportError as err:
        parser.error(str(err))

    from .molecules import generate_molecules

    try:
        summary = generate_molecules(
            out=args.out,
            molecules=names,
            train=args.train,
            val=args.val,
            test=args.test,
            temperature=args.temperature,
            seed=args.seed,
            spacing=args.spacing,
            timestep_fs=args.timestep,
            equilibration=args.equilibration,
            friction_per_fs=args.friction,
            workers=args.workers,
            verbose=not args.quiet,
        )
    except ValueError as err:
        parser.error(str(err))
    except OSError as err:
        parser.error(f"cannot write output: {err}")
    for name in names:
        s = summary[name]
        fr = s["frames"]
        print(
            f"{name} ({s['natoms']} atoms): frames train {fr['train']} / val {fr['val']} / "
            f"test {fr['test']}; mean T {s['mean_temperature']:.0f} K; box {s['box_side']:g} A; "
            f"{s['bond_changed_frames']} frames with changed bonds; MD {s['md_time_s']:.1f} s"
        )
    print(f"wrote {args.out} in {summary['time_s']:.1f} s")
    return 0
