"""eSEN backbone with DeNS force encoding (Eq. 5), a thin subclass of fairchem's.

eSEN is the fairchem 1.10 backbone that can give forces (and stress) as gradients of its energy
(``esen_mlp_efs_head``, which sets ``direct_forces: false``): the energy-conserving variant used for
molecular dynamics and relaxations. The DeNS trainer reads the backbone's ``direct_forces`` to
choose the per-structure losses (:func:`fairchem_dens.trainer.gradient_forces`).

YAML (energy-conserving; stress through autograd with ``regress_stress: true``)::

    model:
      name: hydra
      pass_through_head_outputs: true
      otf_graph: true
      backbone:
        model: fairchem_dens.models.esen.DeNSeSENBackbone
        use_force_encoding: true      # false: Table 1e idx 2
        otf_graph: true
        ...                           # every eSEN_Backbone argument
      heads:
        efs: {module: esen_mlp_efs_head}              # energy, forces = -dE/dr (and stress)
        dens_noise: {module: fairchem_dens.heads.eSENNoiseHead}

Direct forces instead: ``heads: {energy: {module: esen_mlp_energy_head}, forces: {module:
esen_linear_force_head}, dens_noise: ...}`` (the backbone's default ``direct_forces: true``).
"""

from __future__ import annotations

from fairchem.core.common.registry import registry
from fairchem.core.models.esen.esen import eSEN_Backbone

from fairchem_dens.models.base import DeNSEncodingMixin


@registry.register_model("dens_esen_backbone")
class DeNSeSENBackbone(DeNSEncodingMixin, eSEN_Backbone):
    """fairchem's ``eSEN_Backbone`` whose initial node embeddings also receive the force embedding
    of corrupted atoms (Eq. 5) — nothing else differs.

    The parent builds the initial embedding (atom embedding plus edge-degree embedding) in
    ``edge_degree_embedding``; x_f is added to that module's output. The embedding shares
    EquiformerV2's spherical-harmonic layout and rotation convention (the same ``Jd`` matrices),
    so the force encoding is the same module. Arguments: ``use_force_encoding``,
    ``use_sigma_encoding`` (see :class:`DeNSEncodingMixin`) and every parent argument.
    """

    dens_hook_module = "edge_degree_embedding"
