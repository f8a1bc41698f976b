"""Generators of small S2EF LMDB datasets in the OC20 format.

* EMT relaxations of adsorbates on slabs (OC20/OC22 style, also IS2RE):
  ``python -m fairchem_dens.data --out DIR ...``; Python: :func:`generate`.
* MD17-style molecules from GFN2-xTB Langevin MD:
  ``python -m fairchem_dens.data molecules --out DIR ...``; Python: :func:`generate_molecules`.

See ``docs/data.md``.

This ``__init__`` imports nothing heavy (the generators are loaded lazily), so that
``python -m fairchem_dens.data`` can pin the BLAS thread count in ``__main__`` before numpy loads.
"""

from __future__ import annotations

from typing import Any

__all__ = ["generate", "generate_molecules"]


def __getattr__(name: str) -> Any:
    if name == "generate":
        from .generator import generate

        return generate
    if name == "generate_molecules":
        from .molecules import generate_molecules

        return generate_molecules
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
