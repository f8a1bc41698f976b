"""fairchem-dens: DeNS (Denoising Non-Equilibrium Structures) as a fairchem-core 1.10 plugin.

Importing this package checks the installed fairchem-core version and nothing else; the trainer,
models and datasets are imported by fairchem's registry when a YAML names them by dotted path
(``trainer: fairchem_dens.trainer.DeNSTrainer``).
"""

from __future__ import annotations

from importlib import metadata as _metadata

__version__ = "0.1.0"

REQUIRED_FAIRCHEM_CORE = "1.10.0"


def _check_fairchem_version() -> None:
    try:
        found = _metadata.version("fairchem-core")
    except _metadata.PackageNotFoundError:
        raise ImportError(
            f"fairchem_dens requires fairchem-core=={REQUIRED_FAIRCHEM_CORE}, "
            "but fairchem-core is not installed (run scripts/install.sh)"
        ) from None
    if found != REQUIRED_FAIRCHEM_CORE:
        raise ImportError(
            f"fairchem_dens requires fairchem-core=={REQUIRED_FAIRCHEM_CORE}, found {found} "
            "(2.x removed the OCP trainers, EquiformerV2 and eSCN)"
        )


_check_fairchem_version()
