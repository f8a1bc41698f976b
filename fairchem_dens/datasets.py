"""LMDB datasets that apply the DeNS corruption (Alg. 1 l.7-27) to training structures.

Name them in YAML as the dataset ``format`` (a dotted path, so fairchem's registry imports this
module in every process)::

    dataset:
      train:
        format: fairchem_dens.datasets.DeNSLmdbDataset       # OC20 LmdbDataset
        # format: fairchem_dens.datasets.DeNSOC22LmdbDataset  # OC22 OC22LmdbDataset

A dataset of these classes behaves exactly as its fairchem parent until the DeNS trainer calls
:meth:`DeNSDatasetMixin.enable_dens` on the *training* dataset. Validation, test and relaxation
datasets (which fairchem builds with the same ``format`` when ``use_train_settings`` copies the
train settings) are never enabled, so they are never corrupted.

The corruption runs inside ``__getitem__``, so in DataLoader workers, after fairchem's own
transforms and ``key_mapping``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from fairchem.core.common.registry import registry
from fairchem.core.datasets.lmdb_dataset import LmdbDataset
from fairchem.core.datasets.oc22_lmdb_dataset import OC22LmdbDataset

from fairchem_dens import keys
from fairchem_dens.config import DeNSConfig
from fairchem_dens.noise import Corruption, Status, draw_corruption, structure_rng


class DeNSDatasetMixin:
    """Adds the per-structure DeNS corruption to a fairchem LMDB dataset (inactive by default)."""

    _dens: DeNSConfig | None = None
    _dens_seed: int = 0
    _dens_epoch: int = 0
    _dens_force_mean: float = 0.0
    _dens_force_std: float = 1.0

    def enable_dens(
        self, config: DeNSConfig, seed: int, force_mean: float = 0.0, force_std: float = 1.0
    ) -> None:
        """Turn the corruption on (training split only).

        Args:
            config: validated DeNS settings.
            seed: corruption seed; structure ``i`` of epoch ``e`` depends only on (seed, e, i).
            force_mean: mean of the forces normaliser, eV/Å (0 for fairchem's force normaliser).
            force_std: σ_F, the forces normaliser's std in eV/Å; encoded forces are (f-mean)/σ_F.
        """
        if not force_std > 0:
            raise ValueError(f"forces normalizer stdev must be > 0, got {force_std!r}")
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

    def _dens_key(self, name: str) -> str:
        mapping: dict[str, str] = self.config.get("key_mapping") or {}
        return mapping.get(name, name)

    def __getitem__(self, idx: int) -> Any:
        data = super().__getitem__(idx)
        if self._dens is None:
            return data
        return self._dens_corrupt(data, idx)

    def _dens_corrupt(self, data: Any, idx: int) -> Any:
        """Corrupt one structure in place and add the :mod:`fairchem_dens.keys` fields.

        Outside the ``epochs`` window the structure is returned untouched and without DeNS
        fields, so such a step costs what a plain step costs.
        """
        config = self._dens
        if not config.active_in_epoch(self._dens_epoch):
            return data
        force_key = self._dens_key("force")
        forces = data[force_key] if force_key in data else None
        if forces is None:
            raise KeyError(
                f"{self.path}: entry {idx} has no '{force_key}' field; DeNS needs force labels "
                "on the training split"
            )
        num_atoms = data.pos.shape[0]
        if config.candidates == "free":
            if "fixed" not in data:
                raise KeyError(
                    f"{self.path}: entry {idx} has no 'fixed' field, needed by optim.dens."
                    "candidates=free (OC20 mode); use candidates: all for OC22-style data"
                )
            candidates = data.fixed.view(-1).numpy() == 0
        else:
            candidates = np.ones(num_atoms, dtype=bool)

        rng = structure_rng(self._dens_seed, self._dens_epoch, idx)
        corruption = draw_corruption(config, rng, candidates, forces.detach().numpy())
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


def find_dens_dataset(dataset: Any) -> DeNSDatasetMixin | None:
    """The DeNS dataset under fairchem's ``Subset`` wrappers, or None if there is none."""
    while dataset is not None:
        if isinstance(dataset, DeNSDatasetMixin):
            return dataset
        dataset = getattr(dataset, "dataset", None)
    return None
