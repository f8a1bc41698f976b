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

from fairchem.core.common.registry import registry
from fairchem.core.models.equiformer_v2.equiformer_v2 import EquiformerV2Backbone

from fairchem_dens.models.base import DeNSEncodingMixin


@registry.register_model("dens_equiformer_v2_backbone")
class DeNSEquiformerV2Backbone(DeNSEncodingMixin, EquiformerV2Backbone):
    """fairchem's ``EquiformerV2Backbone`` whose initial node embeddings also receive the force
    embedding of corrupted atoms (Eq. 5) — nothing else differs.

    The parent sums the atom embedding and ``edge_degree_embedding``'s output into the initial
    embedding; x_f is added to the latter's output. Arguments: ``use_force_encoding``,
    ``use_sigma_encoding`` (see :class:`DeNSEncodingMixin`) and every parent argument.
    """

    dens_hook_module = "edge_degree_embedding"
