"""eSCN backbone with DeNS force encoding (Eq. 5), a thin subclass of fairchem's.

YAML::

    model:
      name: hydra
      backbone:
        model: fairchem_dens.models.escn.DeNSeSCNBackbone
        use_force_encoding: true
        ...                       # every eSCNBackbone argument
      heads:
        energy: {module: escn_energy_head}
        forces: {module: escn_force_head}
        dens_noise: {module: fairchem_dens.heads.eSCNNoiseHead}
"""

from __future__ import annotations

from typing import Any

import torch
from fairchem.core.common.registry import registry
from fairchem.core.models.escn.escn import eSCNBackbone

from fairchem_dens.models.base import DeNSEncodingMixin


@registry.register_model("dens_escn_backbone")
class DeNSeSCNBackbone(DeNSEncodingMixin, eSCNBackbone):
    """fairchem's ``eSCNBackbone`` whose initial node embeddings (the first layer's input) also
    receive the force embedding of corrupted atoms (Eq. 5) — nothing else differs.

    Args:
        use_force_encoding: encode the forces of corrupted atoms (False: Table 1e idx 2).
        use_sigma_encoding: also encode each DeNS structure's σ (Table 1e idx 5).
        **kwargs: every argument of ``eSCNBackbone``.
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
            initial_embedding=self.layer_blocks[0],
            use_force_encoding=use_force_encoding,
            use_sigma_encoding=use_sigma_encoding,
            hook_input=True,
        )

    def forward(self, data: Any) -> dict[str, torch.Tensor]:
        """Parent forward with the DeNS embedding added to the first layer's input."""
        with self.dens_encoding(data):
            return super().forward(data)
