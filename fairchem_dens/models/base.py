"""What the force-encoding backbones share: build the DeNS embedding of a batch and add it to
the initial node embeddings (Eq. 5) without copying the parent's forward.

"We simply add the force embeddings to initial node embeddings" (§3.2.2). A hook adds the DeNS
embedding where the parent's forward finishes its initial node embedding, so the parent's code and
state-dict keys stay untouched:

* EquiformerV2 builds ``x = atom embedding + edge-degree embedding``: a forward hook adds x_f to
  the edge-degree embedding's output, so the sum becomes ``x + x_f``;
* eSCN feeds the atom embedding ``x`` to its first layer: a forward pre-hook on that layer adds
  x_f to its input;
* eSEN builds ``x`` in its edge-degree embedding (a plain tensor there, not an ``SO3_Embedding``):
  the same forward hook as EquiformerV2's adds x_f to that module's output.

With ``activation_checkpoint: true`` gradients are unchanged (tests/test_fairchem_flows.py):
EquiformerV2 checkpoints its blocks, which come after the hooked module, so a block's recomputation
in the backward pass reads the stored sum; fairchem 1.10's ``eSCNBackbone`` accepts the flag but
never checkpoints (only its legacy ``eSCN`` class does), so the pre-hook runs once per forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from fairchem.core.common import gp_utils
from torch import nn

from fairchem_dens import keys
from fairchem_dens.dens_only import separate_rng
from fairchem_dens.force_encoding import ForceEncoding, SigmaEncoding


def dens_lmax(backbone: Any) -> int:
    """L_max of a backbone's node embeddings: ``lmax_list`` (EquiformerV2, eSCN; one resolution)
    or ``lmax`` (eSEN)."""
    lmax_list = getattr(backbone, "lmax_list", None)
    if lmax_list is None:
        return int(backbone.lmax)
    if len(lmax_list) != 1:
        raise ValueError(f"DeNS force encoding supports one resolution, got lmax_list={lmax_list}")
    return int(lmax_list[0])


class DeNSEncodingMixin:
    """Mixin for a fairchem backbone whose initial node embedding has the (n_atoms, (L_max+1)², C)
    spherical-harmonic layout (an ``SO3_Embedding`` or a plain tensor).

    A subclass names where the parent finishes its initial node embedding
    (:attr:`dens_hook_module`, a submodule path) and whether x_f goes to that module's output or
    to its first input (:attr:`dens_hook_input`); everything else is the parent's.

    Args:
        use_force_encoding: encode the forces of corrupted atoms (Eq. 5; False: Table 1e idx 2).
        use_sigma_encoding: also encode each DeNS structure's σ (Table 1e idx 5).
        *args, **kwargs: the parent backbone's arguments.
    """

    dens_hook_module: str
    dens_hook_input: bool = False
    force_encoding: ForceEncoding | None
    sigma_encoding: SigmaEncoding | None

    def __init__(
        self,
        *args: Any,
        use_force_encoding: bool = True,
        use_sigma_encoding: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        lmax = dens_lmax(self)
        for name, value in (
            ("use_force_encoding", use_force_encoding),
            ("use_sigma_encoding", use_sigma_encoding),
        ):
            if not isinstance(value, bool):
                raise ValueError(f"model.backbone.{name}={value!r}: must be true or false")
        self.use_force_encoding = use_force_encoding
        self.use_sigma_encoding = use_sigma_encoding
        modules = self.build_dens_modules(
            lmax, self.sphere_channels, use_force_encoding, use_sigma_encoding
        )
        self.force_encoding = modules["force_encoding"]
        self.sigma_encoding = modules["sigma_encoding"]
        self._dens_embedding: torch.Tensor | None = None
        hooked = self.get_submodule(self.dens_hook_module)
        if self.dens_hook_input:
            hooked.register_forward_pre_hook(self._add_dens_embedding_to_input)
        else:
            hooked.register_forward_hook(self._add_dens_embedding)

    @staticmethod
    def build_dens_modules(
        lmax: int,
        channels: int,
        use_force_encoding: bool = True,
        use_sigma_encoding: bool = False,
    ) -> dict[str, nn.Module | None]:
        """The DeNS-only modules of the backbone by attribute name (None where switched off).

        Each is built from its own random stream, so the heads built after the backbone start
        as in the parent model. Checkpoint loading calls this to learn the names of a DeNS
        checkpoint's modules.
        """
        with separate_rng("force_encoding"):
            force = ForceEncoding(lmax, channels) if use_force_encoding else None
        with separate_rng("sigma_encoding"):
            sigma = SigmaEncoding(channels) if use_sigma_encoding else None
        return {"force_encoding": force, "sigma_encoding": sigma}

    def forward(self, data: Any) -> dict[str, torch.Tensor]:
        """The parent's forward, with the batch's DeNS embedding added by the hook."""
        with self.dens_encoding(data):
            return super().forward(data)

    def dens_embedding(self, data: Any) -> torch.Tensor | None:
        """(n_atoms, (Lmax+1)², C) DeNS embedding of a batch, or None when it has no DeNS fields
        (evaluation, predict, relaxation, original-task-only data) or encodes nothing."""
        if keys.DENS_FORCE_INPUT not in data:
            return None
        embedding = None
        if self.force_encoding is not None:
            embedding = self.force_encoding(data[keys.DENS_FORCE_INPUT])  # Eq. 5
        if self.sigma_encoding is not None:
            batch = data.batch
            if batch is None:
                batch = torch.zeros(data.pos.shape[0], dtype=torch.long, device=data.pos.device)
            sigma = self.sigma_encoding(data[keys.DENS_SIGMA][batch])  # (n_atoms, C)
            if embedding is None:
                embedding = sigma.new_zeros(
                    sigma.shape[0], (dens_lmax(self) + 1) ** 2, sigma.shape[1]
                )
            embedding = torch.cat([embedding[:, :1] + sigma.unsqueeze(1), embedding[:, 1:]], 1)
        return embedding

    @contextlib.contextmanager
    def dens_encoding(self, data: Any) -> Iterator[None]:
        """Within the block, the hooked module's output receives the batch's DeNS embedding."""
        embedding = self.dens_embedding(data)
        if embedding is not None and gp_utils.initialized():
            raise NotImplementedError("DeNS force encoding does not support graph parallelism")
        self._dens_embedding = embedding
        try:
            yield
        finally:
            self._dens_embedding = None

    def _add_dens_embedding(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if self._dens_embedding is None:
            return output
        if isinstance(output, torch.Tensor):  # eSEN: the embedding tensor itself
            return output + self._dens_embedding.to(output.dtype)
        output.embedding = output.embedding + self._dens_embedding.to(output.embedding.dtype)
        return output

    def _add_dens_embedding_to_input(self, module: nn.Module, inputs: tuple) -> None:
        self._add_dens_embedding(module, (), inputs[0])
