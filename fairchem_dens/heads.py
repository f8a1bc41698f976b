"""Noise heads: predict ε̂ ≈ ε/σ per atom (Alg. 1 l.28, Eq. 4).

DeNS-only modules (:class:`fairchem_dens.dens_only.DeNSOnly`), built from their own random stream.
Each runs only on batches that carry DeNS fields (training with DeNS active): on validation,
predict and relaxation batches it returns nothing and costs nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from fairchem.core.common.registry import registry
from fairchem.core.models.equiformer_v2.heads import EqV2VectorHead
from fairchem.core.models.escn.escn import eSCNForceHead

from fairchem_dens import keys
from fairchem_dens.dens_only import DeNSOnly, separate_rng


@registry.register_model("dens_equiformer_v2_noise_head")
class EqV2NoiseHead(DeNSOnly, EqV2VectorHead):
    """One additional equivariant graph-attention block on EquiformerV2's final node embeddings
    (App. B.1, C.1): fairchem's vector head, reading its degree-1 output as ε̂.

    Args:
        backbone: the (DeNS) EquiformerV2 backbone.
        output_name: output key, default :data:`fairchem_dens.keys.NOISE_OUTPUT`.
    """

    def __init__(self, backbone: Any, output_name: str = keys.NOISE_OUTPUT) -> None:
        with separate_rng("noise_head"):  # the parent's heads start as without DeNS
            super().__init__(backbone, output_name=output_name)

    def forward(self, data: Any, emb: dict[str, Any]) -> dict[str, torch.Tensor]:
        """(n_atoms, 3) noise prediction under ``output_name``; {} without DeNS fields."""
        if keys.DENS_FORCE_INPUT not in data:
            return {}
        return super().forward(data, emb)


@registry.register_model("dens_escn_noise_head")
class eSCNNoiseHead(DeNSOnly, eSCNForceHead):
    """eSCN's own cheap output block for vectors (§4.1, Table 1d: +1.5% time): the per-sphere-point
    block fairchem's eSCN uses for forces, applied to the same sphere samples, read as ε̂.

    Args:
        backbone: the (DeNS) eSCN backbone.
        output_name: output key, default :data:`fairchem_dens.keys.NOISE_OUTPUT`.
    """

    def __init__(self, backbone: Any, output_name: str = keys.NOISE_OUTPUT) -> None:
        with separate_rng("noise_head"):  # the parent's heads start as without DeNS
            super().__init__(backbone)
        self.output_name = output_name

    def forward(self, data: Any, emb: dict[str, Any]) -> dict[str, torch.Tensor]:
        """(n_atoms, 3) noise prediction under ``output_name``; {} without DeNS fields."""
        if keys.DENS_FORCE_INPUT not in data:
            return {}
        return {self.output_name: super().forward(data, emb)["forces"]}
