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

from fairchem.core.common.registry import registry
from fairchem.core.models.escn.escn import eSCNBackbone

from fairchem_dens.models.base import DeNSEncodingMixin


@registry.register_model("dens_escn_backbone")
class DeNSeSCNBackbone(DeNSEncodingMixin, eSCNBackbone):
    """fairchem's ``eSCNBackbone`` whose initial node embeddings (the first layer's input) also
    receive the force embedding of corrupted atoms (Eq. 5) — nothing else differs.

    Arguments: ``use_force_encoding``, ``use_sigma_encoding`` (see :class:`DeNSEncodingMixin`)
    and every parent argument.
    """

    dens_hook_module = "layer_blocks.0"
    dens_hook_input = True
