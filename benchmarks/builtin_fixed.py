"""fairchem 1.10's built-in DeNS trainer without its extra force term (a benchmark control).

On a DeNS batch, ``DenoisingForcesTrainer._compute_loss`` (fairchem/core/models/equiformer_v2/
trainers/dens_trainer.py) appends the DeNS loss of the ``forces`` output and then falls through to
the generic code, which appends ``λ_F · ℓ(pred, norm_F(target))`` once more, with ``target`` the
DeNS target (noise / σ_high on corrupted atoms, normalised forces elsewhere) divided a second time
by the forces normaliser, over all atoms (fixed ones included). This subclass subtracts exactly
that term, so the loss is the built-in trainer's intended one; everything else is unchanged.

YAML (``benchmarks/`` on ``sys.path``, as the benchmark scripts put it)::

    trainer: builtin_fixed.BuiltinDeNSWithoutExtraForceTerm
"""

from __future__ import annotations

from typing import Any

import torch
from fairchem.core.models.equiformer_v2.trainers.dens_trainer import DenoisingForcesTrainer


class BuiltinDeNSWithoutExtraForceTerm(DenoisingForcesTrainer):
    """The built-in DeNS trainer minus the extra λ_F force term on DeNS batches."""

    def extra_force_term(self, out: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """The term the parent adds on a DeNS batch after its DeNS loss (a scalar tensor)."""
        noise = self.normalizers["denoising_pos_target"].norm(batch.noise_vec)
        pred = out["forces"]
        if hasattr(batch, "noise_mask"):
            forces = self.normalizers["forces"].norm(batch.forces)
            mask = batch.noise_mask.view(-1, 1)
            target = noise * mask + forces * (~mask)
        else:
            target = noise
            spec = self.output_targets["forces"]
            if spec["level"] == "atom" and spec["train_on_free_atoms"]:
                free = batch.fixed == 0
                target, pred = target[free], pred[free]
        target = self.normalizers["forces"].norm(target)  # the second normalisation
        loss_info = dict(self.loss_functions)["forces"]
        return loss_info["coefficient"] * loss_info["fn"](pred, target, natoms=batch.natoms)

    def _compute_loss(self, out: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        loss = super()._compute_loss(out, batch)
        if batch.get("denoising_pos_forward", False):
            loss = loss - self.extra_force_term(out, batch)
        return loss
