"""EquiformerV2 backbone with DeNS force encoding (Eq. 5), a thin subclass of fairchem's.

YAML::

    model:
      name: hydra
      backbone:
        model: fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone
        use_force_encoding: true    # false: Table 1e idx 2
        use_sigma_encoding: false   # true: Table 1e idx 5
        ...                         # every EquiformerV2Backbone argument
      heads:
        energy: {module: equiformerV2_scalar_head}
        forces: {module: equiformerV2_vector_head}
        dens_noise: {module: fairchem_dens.heads.EqV2NoiseHead}
"""

from __future__ import annotations

from typing import Any

import torch
from fairchem.core.common.registry import registry
from fairchem.core.models.equiformer_v2.equiformer_v2 import EquiformerV2Backbone

from fairchem_dens.models.base import DeNSEncodingMixin


@registry.register_model("dens_equiformer_v2_backbone")
class DeNSEquiformerV2Backbone(DeNSEncodingMixin, EquiformerV2Backbone):
    """fairchem's ``EquiformerV2Backbone`` whose initial node embeddings also receive the force
    embedding of corrupted atoms (Eq. 5) — nothing else differs.

    Args:
        use_force_encoding: encode the forces of corrupted atoms (False: Table 1e idx 2).
        use_sigma_encoding: also encode each DeNS structure's σ (Table 1e idx 5).
        **kwargs: every argument of ``EquiformerV2Backbone``.
    """

    def __init__(
        self,
        *args: Any,
        use_force_encoding: bool = True,
        use_sigma_encoding: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.init_dens_encoding(
            lmax_list=self.lmax_list,
            channels=self.sphere_channels,
            initial_embedding=self.edge_degree_embedding,
            use_force_encoding=use_force_encoding,
            use_sigma_encoding=use_sigma_encoding,
        )

    def forward(self, data: Any) -> dict[str, torch.Tensor]:
        """Parent forward with the DeNS embedding added after the edge-degree embedding."""
        with self.dens_encoding(data):
            return super().forward(data)
