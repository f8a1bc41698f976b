"""Defaults and argument validation shared by the CLI and :func:`generate` (no heavy imports).

Kept free of numpy/torch/ASE imports so the CLI can reject bad arguments instantly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: Metals that ASE's EMT calculator parametrises (it also knows H, C, N, O).
EMT_METALS: tuple[str, ...] = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
#: Default slab metals.
DEFAULT_METALS: tuple[str, ...] = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")

VARIANTS: tuple[str, ...] = ("oc20", "oc22")
SPLITS: tuple[str, ...] = ("train", "val", "test")

DEFAULT_SYSTEMS = 24  # systems (trajectories) per variant: ~650-1000 frames with the defaults
DEFAULT_MAX_STEPS = 50  # BFGS steps per system
DEFAULT_MAX_FORCE = 50.0  # eV/Å; frames whose largest per-atom force norm exceeds it are dropped
DEFAULT_FMAX = 0.05  # eV/Å, BFGS convergence threshold
DEFAULT_VAL_FRAC = 0.15
DEFAULT_TEST_FRAC = 0.15

#: Environment variables pinned before numpy loads (CLI) or before worker processes start.
#: BLAS threading slows EMT/BFGS down and changes the rounding, hence the bytes of the output.
THREAD_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

#: True when THREAD_ENV was set before numpy was imported in this process (``__main__`` does
#: that). Otherwise :func:`generate` runs the relaxations in spawned worker processes, which
#: get THREAD_ENV, so the output does not depend on how the caller configured BLAS.
BLAS_PINNED: bool = False


def parse_metals(metals: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Validate metals (comma string or sequence, case-insensitive); return canonical symbols.

    Raises:
        ValueError: one-line message naming the first metal EMT does not support.
    """
    if metals is None:
        return DEFAULT_METALS
    items = metals.split(",") if isinstance(metals, str) else [str(m) for m in metals]
    items = [m.strip() for m in items if m.strip()]
    if not items:
        raise ValueError(f"no metals given (EMT supports: {', '.join(EMT_METALS)})")
    canon = {m.lower(): m for m in EMT_METALS}
    out: list[str] = []
    for m in items:
        if m.lower() not in canon:
            raise ValueError(f"unknown metal {m!r} (EMT supports: {', '.join(EMT_METALS)})")
        if canon[m.lower()] not in out:
            out.append(canon[m.lower()])
    return tuple(out)


def split_counts(systems: int, val_frac: float, test_frac: float) -> tuple[int, int, int]:
    """Numbers of (train, val, test) systems; a non-zero fraction gets at least one system.

    Raises:
        ValueError: if a fraction is outside [0, 1) or no train system is left.
    """
    for name, frac in (("val_frac", val_frac), ("test_frac", test_frac)):
        ok = isinstance(frac, (int, float)) and math.isfinite(frac) and 0.0 <= frac < 1.0
        if not ok:
            raise ValueError(f"{name} must be in [0, 1), got {frac!r}")
    n_val = max(1, round(val_frac * systems)) if val_frac > 0 else 0
    n_test = max(1, round(test_frac * systems)) if test_frac > 0 else 0
    n_train = systems - n_val - n_test
    if n_train < 1:
        raise ValueError(
            f"val_frac={val_frac} and test_frac={test_frac} leave no train systems out of "
            f"{systems} (val {n_val}, test {n_test})"
        )
    return n_train, n_val, n_test


def check_writable(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and check a file can be written there.

    Raises:
        ValueError: one-line message if the directory cannot be created or written.
    """
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".fairchem_dens_write_probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"output path {str(path)!r} is not writable ({reason})") from None
    return path
