"""Noise heads: predict ε̂ ≈ ε/σ per atom (Alg. 1 l.28, Eq. 4).

DeNS-only modules (:class:`fairchem_dens.dens_only.DeNSOnly`), built from their own random stream.
Each runs only on batches that carry DeNS fields (training with DeNS active): on validation,
predict and relaxation batches it returns nothing and costs nothing.

The loss reads ε̂ only on corrupted atoms (m_i = 1, Eq. 4 / Alg. 1 l.30), so by default
(``only_corrupted=True``) a head computes only those rows: the EquiformerV2 head runs its
graph-attention block on the edges that end on a corrupted atom, the eSCN head its
per-sphere-point block on the corrupted atoms, the eSEN head its atom-wise block on the corrupted
atoms. Those rows equal the full computation (the same
fairchem modules on the inputs they read); the other rows are zero (the contract of
:data:`fairchem_dens.keys.NOISE_OUTPUT`: unspecified outside corrupted atoms). A batch without a
corrupted atom skips the block entirely.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from fairchem.core.common import gp_utils
from fairchem.core.common.registry import registry
from fairchem.core.models.equiformer_v2.heads import EqV2VectorHead
from fairchem.core.models.equiformer_v2.so3 import SO3_Rotation
from fairchem.core.models.escn.escn import eSCNForceHead
from fairchem.core.models.esen.esen import Linear_Force_Head
from fairchem.core.models.esen.esen_block import GridAtomwise, SpectralAtomwise
from fairchem.core.models.esen.nn.layer_norm import get_normalization_layer
from torch import nn

from fairchem_dens import keys
from fairchem_dens.dens_only import DeNSOnly, separate_rng


def _skipped(head: nn.Module, num_atoms: int, like: torch.Tensor) -> torch.Tensor:
    """(num_atoms, 3) zeros standing for a head that had nothing to compute.

    While gradients are recorded the zeros carry ``0 · Σ p`` over the head's parameters, so
    every parameter still receives a (zero) gradient: DDP without ``find_unused_parameters``
    stays in step on a rank whose batch has no corrupted atom, and the optimiser treats the head
    as it did when the head ran on every atom (zero gradient, not a missing one).
    """
    zeros = like.new_zeros(num_atoms, 3)
    if not torch.is_grad_enabled():
        return zeros
    params = [p for p in head.parameters() if p.requires_grad]
    if not params:
        return zeros
    return zeros + 0.0 * sum(p.sum() for p in params)


def _check_switch(only_corrupted: Any) -> None:
    """One line naming the key when ``only_corrupted`` is not a bool."""
    if not isinstance(only_corrupted, bool):
        raise ValueError(f"model.heads.*.only_corrupted={only_corrupted!r}: must be true or false")


def _corrupted(data: Any) -> torch.Tensor:
    """(n_atoms,) bool m_i of the batch (Alg. 1 l.19)."""
    return data[keys.DENS_MASK].view(-1).bool()


def _per_atom_noise(
    head: nn.Module,
    data: Any,
    rows: torch.Tensor,
    block: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Run a per-atom ``block`` ((k, ...) rows of k atoms -> (k, 3)) on the corrupted atoms'
    rows only (``head.only_corrupted``) or on all of them: (n_atoms, 3), zeros on the rows of
    atoms it skipped (and no work at all without a corrupted atom).

    Args:
        head: the noise head (its ``only_corrupted`` switch; parameters for the skip path).
        data: the batch (its ``keys.DENS_MASK``).
        rows: (n_atoms, ...) per-atom inputs of the block.
        block: the head's per-atom computation.
    """
    if not head.only_corrupted:
        return block(rows)
    atoms = _corrupted(data).nonzero().view(-1)  # one host synchronisation
    if atoms.numel() == 0:
        return _skipped(head, rows.shape[0], rows)
    noise = block(rows.index_select(0, atoms))
    return noise.new_zeros(rows.shape[0], 3).index_copy(0, atoms, noise)


class _EdgeSubsetRotation(SO3_Rotation):
    """fairchem's per-edge Wigner-D rotation, restricted to a subset of the backbone's edges.

    Holds the same coefficient mapping (and so the same state-dict entries) as the backbone's
    ``SO3_Rotation`` it reads; :meth:`select` copies that rotation's Wigner-D matrices of the
    chosen edges (all of them for ``edges=None``) before each use. The backbone's own rotation
    objects are never modified.
    """

    def __init__(self, full: SO3_Rotation) -> None:
        super().__init__(full.lmax)
        self.mapping = full.mapping  # shared: same buffers and state-dict keys as before

    def select(self, full: SO3_Rotation, edges: torch.Tensor | None) -> None:
        """Use ``full``'s Wigner-D matrices of ``edges`` ((E',) int64 edge ids, or None: all)."""
        self.device, self.dtype = full.device, full.dtype
        if edges is None:
            self.wigner, self.wigner_inv = full.wigner, full.wigner_inv
        else:
            self.wigner = full.wigner.index_select(0, edges)
            self.wigner_inv = full.wigner_inv.index_select(0, edges)


@registry.register_model("dens_equiformer_v2_noise_head")
class EqV2NoiseHead(DeNSOnly, EqV2VectorHead):
    """One additional equivariant graph-attention block on EquiformerV2's final node embeddings
    (App. B.1, C.1): fairchem's vector head, reading its degree-1 output as ε̂.

    The block's output at atom i depends only on the messages of the edges j → i (their softmax
    over i's incoming edges, Eq. of App. B.1), each computed from the node embeddings of j and i,
    the edge's distance embedding and its Wigner-D rotation. With ``only_corrupted`` the block
    receives all node embeddings but only the edges whose target is corrupted (with their
    distance embeddings and rotations), so its rows of corrupted atoms are exactly the full
    block's and all other rows are zero.

    Args:
        backbone: the (DeNS) EquiformerV2 backbone.
        output_name: output key, default :data:`fairchem_dens.keys.NOISE_OUTPUT`.
        only_corrupted: compute only what the loss reads (default); False: every atom (the
            reference computation, kept for tests and benchmarks).
    """

    def __init__(
        self, backbone: Any, output_name: str = keys.NOISE_OUTPUT, only_corrupted: bool = True
    ) -> None:
        _check_switch(only_corrupted)
        with separate_rng("noise_head"):  # the parent's heads start as without DeNS
            super().__init__(backbone, output_name=output_name)
        self.only_corrupted = only_corrupted
        # the block rotates messages with these; the backbone's rotations stay untouched
        self._backbone_rotation = tuple(backbone.SO3_rotation)  # not registered: a plain tuple
        self.force_block.SO3_rotation = nn.ModuleList(
            _EdgeSubsetRotation(rotation) for rotation in self._backbone_rotation
        )

    def forward(self, data: Any, emb: dict[str, Any]) -> dict[str, torch.Tensor]:
        """(n_atoms, 3) noise prediction under ``output_name`` (rows of corrupted atoms; zeros
        elsewhere with ``only_corrupted``); {} without DeNS fields."""
        if keys.DENS_MASK not in data:
            return {}
        graph = emb["graph"]
        if not self.only_corrupted or gp_utils.initialized():
            self._select_edges(None)
            return super().forward(data, emb)
        node_embedding = emb["node_embedding"].embedding
        num_atoms = node_embedding.shape[0]
        # edges j → i with m_i = 1 (one host synchronisation: the number of such edges)
        edges = _corrupted(data)[graph.edge_index[1]].nonzero().view(-1)
        if edges.numel() == 0:  # no corrupted atom (or none with a neighbour): nothing to read
            return {self.output_name: _skipped(self, num_atoms, node_embedding)}
        self._select_edges(edges)
        sub_graph = dataclasses.replace(
            graph,
            edge_index=graph.edge_index.index_select(1, edges),
            edge_distance=graph.edge_distance.index_select(0, edges),
        )
        return super().forward(data, {**emb, "graph": sub_graph})

    def _select_edges(self, edges: torch.Tensor | None) -> None:
        for subset, full in zip(
            self.force_block.SO3_rotation, self._backbone_rotation, strict=True
        ):
            subset.select(full, edges)


@registry.register_model("dens_escn_noise_head")
class eSCNNoiseHead(DeNSOnly, eSCNForceHead):
    """eSCN's own cheap output block for vectors (§4.1, Table 1d: +1.5% time): the per-sphere-point
    block fairchem's eSCN uses for forces, applied to the same sphere samples, read as ε̂.

    The block acts on each atom's sphere samples independently, so with ``only_corrupted`` it
    runs on the corrupted atoms' samples only; their rows equal the full block's, others are 0.

    Args:
        backbone: the (DeNS) eSCN backbone.
        output_name: output key, default :data:`fairchem_dens.keys.NOISE_OUTPUT`.
        only_corrupted: compute only what the loss reads (default); False: every atom.
    """

    def __init__(
        self, backbone: Any, output_name: str = keys.NOISE_OUTPUT, only_corrupted: bool = True
    ) -> None:
        _check_switch(only_corrupted)
        with separate_rng("noise_head"):  # the parent's heads start as without DeNS
            super().__init__(backbone)
        self.output_name = output_name
        self.only_corrupted = only_corrupted

    def forward(self, data: Any, emb: dict[str, Any]) -> dict[str, torch.Tensor]:
        """(n_atoms, 3) noise prediction under ``output_name`` (rows of corrupted atoms; zeros
        elsewhere with ``only_corrupted``); {} without DeNS fields."""
        if keys.DENS_MASK not in data:
            return {}
        values = emb["sphere_values"]  # (n_atoms · S, C): S sphere samples per atom
        samples = self.force_block.num_sphere_samples
        parent = super().forward

        def block(selected: torch.Tensor) -> torch.Tensor:  # (k, S, C) -> (k, 3)
            flat = selected.reshape(-1, values.shape[1])
            return parent(data, {**emb, "sphere_values": flat})["forces"]

        rows = values.view(values.shape[0] // samples, samples, -1)
        return {self.output_name: _per_atom_noise(self, data, rows, block)}


#: eSEN's atom-wise feed-forward blocks by the backbone's ``mlp_type``.
ESEN_ATOMWISE = {"grid": GridAtomwise, "spectral": SpectralAtomwise}


@registry.register_model("dens_esen_noise_head")
class eSENNoiseHead(DeNSOnly, Linear_Force_Head):
    """eSEN's own vector output, fairchem's ``esen_linear_force_head`` (an SO(3)-linear map of the
    degree ≤ 1 coefficients to one channel, read at degree 1), after one more of eSEN's atom-wise
    blocks (the backbone's norm and ``mlp_type`` feed-forward, with a residual) on the final node
    embeddings, read as ε̂ (Alg. 1 l.28).

    As for EquiformerV2 and eSCN, the noise head is the model family's own direct vector output,
    never the ``forces`` output: with ``direct_forces: false`` eSEN's forces are −∂E/∂r and the
    noise is a separate, equivariant (degree-1) prediction. Every operation acts on each atom's
    embedding alone, so with ``only_corrupted`` the head runs on the corrupted atoms only and
    their rows equal the full computation; other rows are 0.

    Args:
        backbone: the (DeNS) eSEN backbone.
        output_name: output key, default :data:`fairchem_dens.keys.NOISE_OUTPUT`.
        only_corrupted: compute only what the loss reads (default); False: every atom.
    """

    def __init__(
        self, backbone: Any, output_name: str = keys.NOISE_OUTPUT, only_corrupted: bool = True
    ) -> None:
        _check_switch(only_corrupted)
        with separate_rng("noise_head"):  # the parent's heads start as without DeNS
            super().__init__(backbone)
            self.norm = get_normalization_layer(
                backbone.norm_type, lmax=backbone.lmax, num_channels=backbone.sphere_channels
            )
            self.atom_wise = ESEN_ATOMWISE[backbone.mlp_type](
                sphere_channels=backbone.sphere_channels,
                hidden_channels=backbone.hidden_channels,
                lmax=backbone.lmax,
                mmax=backbone.mmax,
                SO3_grid=backbone.SO3_grid,
            )
        self.output_name = output_name
        self.only_corrupted = only_corrupted

    def forward(self, data: Any, emb: dict[str, Any]) -> dict[str, torch.Tensor]:
        """(n_atoms, 3) noise prediction under ``output_name`` (rows of corrupted atoms; zeros
        elsewhere with ``only_corrupted``); {} without DeNS fields."""
        if keys.DENS_MASK not in data:
            return {}
        parent = super().forward

        def block(x: torch.Tensor) -> torch.Tensor:  # (k, (L_max+1)², C) -> (k, 3)
            x = x + self.atom_wise(self.norm(x))
            return parent(data, {"node_embedding": x})["forces"]

        return {self.output_name: _per_atom_noise(self, data, emb["node_embedding"], block)}
