"""Generator of small, real OC20/OC22-format S2EF/IS2RE LMDBs from ASE EMT relaxations.

CLI: ``python -m fairchem_dens.data --out DIR ...``; Python: :func:`generate`. See ``docs/data.md``.

This ``__init__`` imports nothing heavy (``generate`` is loaded lazily), so that
``python -m fairchem_dens.data`` can pin the BLAS thread count in ``__main__`` before numpy loads.
"""

from __future__ import annotations

from typing import Any

__all__ = ["generate"]


def __getattr__(name: str) -> Any:
    if name == "generate":
        from .generator import generate

        return generate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
