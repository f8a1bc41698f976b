"""Datasets that apply the DeNS corruption (Alg. 1 l.7-27) to training structures.

Name them in YAML as the dataset ``format`` (a dotted path, so fairchem's registry imports this
module in every process)::

    dataset:
      train:
        format: fairchem_dens.datasets.DeNSLmdbDataset       # OC20 LmdbDataset
        # format: fairchem_dens.datasets.DeNSOC22LmdbDataset  # OC22 OC22LmdbDataset
        # format: fairchem_dens.datasets.DeNSAseDBDataset     # AseDBDataset (ase_db, .aselmdb)

All three share :class:`DeNSDatasetMixin` (one code path for the draw, the filters and the
per-structure opt-outs).

A dataset of these classes behaves exactly as its fairchem parent until the DeNS trainer calls
:meth:`DeNSDatasetMixin.enable_dens` on the *training* dataset. Validation, test and relaxation
datasets (which fairchem builds with the same ``format`` when ``use_train_settings`` copies the
train settings) are never enabled, so they are never corrupted.

The corruption runs inside ``__getitem__``, so in DataLoader workers, after fairchem's own
transforms and ``key_mapping``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fairchem.core.common.registry import registry
from fairchem.core.datasets.ase_datasets import AseDBDataset
from fairchem.core.datasets.lmdb_dataset import LmdbDataset
from fairchem.core.datasets.oc22_lmdb_dataset import OC22LmdbDataset

from fairchem_dens import keys
from fairchem_dens.config import DeNSConfig, DeNSConfigError
from fairchem_dens.noise import Corruption, Status, draw_corruption, structure_rng


class DeNSSourceError(DeNSConfigError):
    """The training data cannot be corrupted as configured; one line naming the key or file."""


class MissingPackageError(ImportError):
    """A package needed to read the data is not installed; one line naming the package."""


def read_skip_list(path: str | Path, num_structures: int) -> np.ndarray:
    """Read ``optim.dens.skip_list``: dataset indices, one per line (``#`` comments and blank
    lines allowed).

    Args:
        path: text file.
        num_structures: length of the training dataset; every index must be in [0, n).

    Returns:
        Sorted unique int64 indices.

    Raises:
        DeNSSourceError: one line naming the file (and line) when it is missing, has an entry
            that is not an integer, or names an index outside the dataset.
    """
    key = f"optim.dens.skip_list={str(path)!r}"
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise DeNSSourceError(f"{key}: cannot read the file ({error.strerror})") from None
    indices = []
    for number, line in enumerate(lines, start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            indices.append(int(entry))
        except ValueError:
            raise DeNSSourceError(
                f"{key}: line {number} {entry!r} is not a dataset index (an integer)"
            ) from None
    found = np.unique(np.asarray(indices, dtype=np.int64))
    unknown = found[(found < 0) | (found >= num_structures)]
    if unknown.size:
        raise DeNSSourceError(
            f"{key}: names {unknown.size} unknown indices (e.g. {int(unknown[0])}); the training "
            f"dataset has indices 0..{num_structures - 1}"
        )
    return found


class DeNSDatasetMixin:
    """Adds the per-structure DeNS corruption to a fairchem dataset (inactive by default).

    Shared by the LMDB and ASE-DB datasets; it needs from its fairchem parent only
    ``__getitem__(int)``, ``__len__``, ``config`` (``src``, ``key_mapping``).
    """

    _dens: DeNSConfig | None = None
    _dens_seed: int = 0
    _dens_epoch: int = 0
    _dens_force_mean: float = 0.0
    _dens_force_std: float = 1.0
    _dens_skip: np.ndarray | None = None
    #: What to tell a user whose data has no forces (the parent's option that reads them).
    _dens_force_hint: str = ""

    def enable_dens(
        self, config: DeNSConfig, seed: int, force_mean: float = 0.0, force_std: float = 1.0
    ) -> None:
        """Turn the corruption on (training split only).

        Reads ``skip_list`` and checks on the first entry that the fields the settings need
        (forces; ``fixed`` for ``candidates: free``; stress for ``max_stress_norm``) are there.

        Args:
            config: validated DeNS settings.
            seed: corruption seed; structure ``i`` of epoch ``e`` depends only on (seed, e, i).
            force_mean: mean of the forces normaliser, eV/Å (0 for fairchem's force normaliser).
            force_std: σ_F, the forces normaliser's std in eV/Å; encoded forces are (f-mean)/σ_F.

        Raises:
            DeNSSourceError: one line naming the key or file when the data cannot be corrupted.
        """
        if not force_std > 0:
            raise ValueError(f"forces normalizer stdev must be > 0, got {force_std!r}")
        skip = None if config.skip_list is None else read_skip_list(config.skip_list, len(self))
        if len(self) > 0:
            self._dens_check_fields(config, super().__getitem__(0))
        self._dens_skip = skip
        self._dens = config
        self._dens_seed = int(seed)
        self._dens_force_mean = float(force_mean)
        self._dens_force_std = float(force_std)

    def disable_dens(self) -> None:
        """Turn the corruption off again."""
        self._dens = None

    @property
    def dens_enabled(self) -> bool:
        """True once :meth:`enable_dens` was called."""
        return self._dens is not None

    def set_dens_epoch(self, epoch: int) -> None:
        """Set the epoch of the next draws; call before the DataLoader's workers start."""
        self._dens_epoch = int(epoch)

    # ---- where the fields are ----------------------------------------------------------------

    @property
    def dens_source(self) -> str:
        """The data files, for error messages (``dataset.train.src``)."""
        path = getattr(self, "path", None)
        return str(path if path is not None else self.config.get("src"))

    def _dens_key(self, name: str) -> str:
        mapping: dict[str, str] = self.config.get("key_mapping") or {}
        return mapping.get(name, name)

    def _dens_force_keys(self) -> list[str]:
        """Names the force labels may carry after ``key_mapping``: OC20 LMDBs store ``force``,
        fairchem's ASE datasets ``forces``."""
        return list(dict.fromkeys([self._dens_key("force"), self._dens_key("forces")]))

    def _dens_forces(self, data: Any, idx: int) -> torch.Tensor:
        for key in self._dens_force_keys():
            if key in data:
                return data[key]
        names = " or ".join(repr(k) for k in self._dens_force_keys())
        raise DeNSSourceError(
            f"{self.dens_source}: entry {idx} has no {names} field; DeNS needs force labels on "
            f"the training split{self._dens_force_hint}"
        )

    def _dens_stress(self, data: Any, idx: int) -> np.ndarray:
        key = self._dens_key("stress")
        if key not in data:
            raise DeNSSourceError(
                f"optim.dens.max_stress_norm: {self.dens_source} entry {idx} has no {key!r} field "
                "(no stress labels); remove the key or train on data with stress"
            )
        return data[key].detach().reshape(-1).numpy()

    def _dens_check_fields(self, config: DeNSConfig, data: Any) -> None:
        self._dens_forces(data, 0)
        if config.candidates == "free" and "fixed" not in data:
            raise DeNSSourceError(self._dens_no_fixed(0))
        if config.max_stress_norm is not None:
            self._dens_stress(data, 0)

    def _dens_no_fixed(self, idx: int) -> str:
        return (
            f"{self.dens_source}: entry {idx} has no 'fixed' field, needed by optim.dens."
            "candidates=free (OC20 mode); use candidates: all for OC22-style data"
        )

    def _dens_opted_out(self, data: Any, idx: int) -> bool:
        """True if the structure carries a non-zero ``skip_flag`` or ``idx`` is in the skip list."""
        flag = self._dens.skip_flag
        if flag is not None and flag in data:
            value = data[flag]
            if isinstance(value, str) or not isinstance(value, (bool, int, float, torch.Tensor)):
                raise DeNSSourceError(
                    f"optim.dens.skip_flag={flag!r}: {self.dens_source} entry {idx} has "
                    f"{flag}={value!r}; the flag must be a number (non-zero: never corrupted)"
                )
            if bool(torch.as_tensor(value).any()):
                return True
        skip = self._dens_skip
        if skip is None or skip.size == 0:
            return False
        position = int(np.searchsorted(skip, idx))
        return position < skip.size and int(skip[position]) == idx

    # ---- corruption --------------------------------------------------------------------------

    def __getitem__(self, idx: int) -> Any:
        data = super().__getitem__(idx)
        if self._dens is None or isinstance(idx, slice):
            return data  # a slice (ASE datasets) is a list of items already corrupted one by one
        return self._dens_corrupt(data, idx)

    def _dens_corrupt(self, data: Any, idx: int) -> Any:
        """Corrupt one structure in place and add the :mod:`fairchem_dens.keys` fields.

        Outside the ``epochs`` window the structure is returned untouched and without DeNS
        fields, so such a step costs what a plain step costs.
        """
        config = self._dens
        if not config.active_in_epoch(self._dens_epoch):
            return data
        forces = self._dens_forces(data, idx)
        num_atoms = data.pos.shape[0]
        if config.candidates == "free":
            if "fixed" not in data:
                raise DeNSSourceError(self._dens_no_fixed(idx))
            candidates = data.fixed.view(-1).numpy() == 0
        else:
            candidates = np.ones(num_atoms, dtype=bool)
        stress = None if config.max_stress_norm is None else self._dens_stress(data, idx)

        rng = structure_rng(self._dens_seed, self._dens_epoch, idx)
        corruption = draw_corruption(
            config,
            rng,
            candidates,
            forces.detach().numpy(),
            stress=stress,
            opt_out=self._dens_opted_out(data, idx),
        )
        return apply_corruption(
            data,
            corruption,
            forces,
            self._dens_force_mean,
            self._dens_force_std,
            config.target_divisor(corruption.sigma),
        )


def apply_corruption(
    data: Any,
    corruption: Corruption,
    forces: torch.Tensor,
    force_mean: float,
    force_std: float,
    target_divisor: float | None = None,
) -> Any:
    """Write a :class:`Corruption` onto a structure ``Data`` (in place) and return it.

    Args:
        data: torch_geometric ``Data`` with ``pos`` (n, 3) in Å.
        corruption: the draw for this structure.
        forces: (n, 3) raw forces in eV/Å.
        force_mean: forces normaliser mean (eV/Å).
        force_std: forces normaliser std σ_F (eV/Å).
        target_divisor: σ' of the Eq. 4 target ε/σ' in Å (``DeNSConfig.target_divisor``);
            None: the structure's own σ.
    """
    dtype = data.pos.dtype
    mask = torch.from_numpy(corruption.mask)
    noise = torch.from_numpy(corruption.noise).to(dtype)
    is_dens = corruption.status == Status.DENS
    data.pos = data.pos + noise  # Eq. 2 / Alg. 1 l.18: p̃_i = p_i + ε_i (ε_i = 0 if m_i = 0)
    data[keys.DENS_MASK] = mask
    data[keys.DENS_STRUCTURE] = torch.tensor([is_dens])
    data[keys.DENS_SIGMA] = torch.tensor([corruption.sigma], dtype=dtype)
    data[keys.DENS_STATUS] = torch.tensor([int(corruption.status)], dtype=torch.long)
    # Eq. 4 target: ε_i / σ' on corrupted atoms (σ' = σ, or σ_high: `target_scale`), 0 elsewhere
    divisor = corruption.sigma if target_divisor is None else target_divisor
    data[keys.DENS_TARGET] = noise / divisor if is_dens else torch.zeros_like(noise)
    # Alg. 1 l.24: f̃'_i = f'_i · m_i with f'_i = f_i / σ_F the normalised force
    normalised = (forces.to(dtype) - force_mean) / force_std
    data[keys.DENS_FORCE_INPUT] = normalised * mask.unsqueeze(-1).to(dtype)
    return data


@registry.register_dataset("dens_lmdb")
class DeNSLmdbDataset(DeNSDatasetMixin, LmdbDataset):
    """fairchem's OC20 ``LmdbDataset`` with the DeNS corruption for the training split."""

    # fairchem's __del__ reads `envs` even when __init__ failed before setting it (bad `src`)
    envs: tuple = ()


@registry.register_dataset("dens_oc22_lmdb")
class DeNSOC22LmdbDataset(DeNSDatasetMixin, OC22LmdbDataset):
    """fairchem's ``OC22LmdbDataset`` (total energies) with the DeNS corruption for training."""


#: The package fairchem 1.10 imports (only when it opens an ``.aselmdb``) to read one.
ASE_DB_BACKENDS = "ase-db-backends"


@registry.register_dataset("dens_ase_db")
class DeNSAseDBDataset(DeNSDatasetMixin, AseDBDataset):
    """fairchem's ``AseDBDataset`` (``format: ase_db``: OMat24, MPtrj, ``.aselmdb`` files and
    any ASE database) with the DeNS corruption for training.

    Labels are read as fairchem reads them: ``a2g_args: {r_energy: True, r_forces: True,
    r_stress: True}`` for the calculator results of each row, or ``r_data_keys`` for entries of
    the row's ``data`` (the ``skip_flag`` field too). Indices are fairchem's: the rows of every
    database of ``src`` in its (sorted) order.
    """

    # fairchem's __del__ reads `dbs` even when __init__ failed before setting it (bad `src`)
    dbs: tuple = ()
    _dens_pid: int | None = None
    _dens_force_hint = " (set dataset.train.a2g_args r_forces: True)"

    @staticmethod
    def connect_db(address: str | Path, connect_args: dict | None = None) -> Any:
        """fairchem's ``connect_db``; a missing ase-db-backends is one line naming the package
        (fairchem 1.10 imports it only when it meets an ``.aselmdb``)."""
        try:
            return AseDBDataset.connect_db(address, connect_args)
        except ModuleNotFoundError as error:
            if (error.name or "").split(".")[0] != "ase_db_backends":
                raise
            raise MissingPackageError(
                f"dataset src {str(address)!r}: reading .aselmdb files needs the package "
                f"{ASE_DB_BACKENDS} (pip install {ASE_DB_BACKENDS})"
            ) from None

    def get_atoms(self, idx: int) -> Any:
        """fairchem's ``get_atoms``, first re-opening the databases in a forked DataLoader worker.

        A worker inherits the parent's open LMDB environments; ase-db-backends re-opens them in
        the new process, which lmdb 3 refuses ("already open in this process"), so fairchem's own
        ``ase_db`` fails with ``num_workers > 0``. Closing the worker's inherited copies first
        (the parent's stay open) lets the re-open succeed.
        """
        pid = os.getpid()
        if self._dens_pid != pid:
            for db in self.dbs:
                env = getattr(db, "_env", None)
                if env is not None and getattr(db, "_env_pid", pid) != pid:
                    env.close()  # the worker's copy only
                    db._env = None  # ase-db-backends opens a fresh one on next use
            self._dens_pid = pid
        return super().get_atoms(idx)

    def close_db(self) -> None:
        """Close every database (lmdb 3 refuses to open one file twice per process)."""
        for db in self.dbs:
            if hasattr(db, "close"):
                db.close()


def find_dens_dataset(dataset: Any) -> DeNSDatasetMixin | None:
    """The DeNS dataset under fairchem's ``Subset`` wrappers, or None if there is none."""
    while dataset is not None:
        if isinstance(dataset, DeNSDatasetMixin):
            return dataset
        dataset = getattr(dataset, "dataset", None)
    return None
