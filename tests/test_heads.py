"""Noise heads computing only what the loss reads: on corrupted atoms the reduced head equals the
full computation (values and gradients, float64), a batch without a corrupted atom skips the block
(yet every head parameter still gets a zero gradient, as DDP needs), batches without DeNS fields
give nothing, and the reduced output is equivariant."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    EQV2_HEADS,
    ESCN_HEADS,
    ESCN_NOISE_HEAD,
    ESEN_EFS_HEADS,
    ESEN_NOISE_HEAD,
    NOISE_HEAD,
    TINY_EQV2,
    TINY_ESCN,
    TINY_ESEN,
    assert_equivariant,
    hydra,
    random_batch,
    with_dens_fields,
)

from fairchem_dens import keys
from fairchem_dens.heads import EqV2NoiseHead, eSCNNoiseHead, eSENNoiseHead

EQV2 = (
    "fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone",
    TINY_EQV2,
    EQV2_HEADS,
    NOISE_HEAD,
)
ESCN = ("fairchem_dens.models.escn.DeNSeSCNBackbone", TINY_ESCN, ESCN_HEADS, ESCN_NOISE_HEAD)
ESEN = ("fairchem_dens.models.esen.DeNSeSENBackbone", TINY_ESEN, ESEN_EFS_HEADS, ESEN_NOISE_HEAD)
#: the module of each noise head (by backbone) that does the work the reduced head skips
BLOCK = {EQV2[0]: "force_block", ESCN[0]: "force_block", ESEN[0]: "atom_wise"}


def build(kind: tuple, **backbone_args) -> torch.nn.Module:
    backbone, args, heads, noise = kind
    torch.manual_seed(0)
    return hydra({"model": backbone, **args, **backbone_args}, {**heads, **noise})


def dens_batch(sizes=(7, 5, 6), fraction: float = 0.4):
    return with_dens_fields(random_batch(sizes), seed=3, corrupted_fraction=fraction)


def head_and_embedding_float64(model, batch):
    """The noise head in float64 and the backbone's embedding of ``batch`` (computed in float32,
    as fairchem's graph generation requires) cast to float64 leaves that require gradients."""
    with torch.no_grad():
        emb = model.backbone(batch)
    head = model.output_heads["dens_noise"].double()
    if isinstance(emb["node_embedding"], torch.Tensor):  # eSEN: a plain (n, (L+1)², C) tensor
        emb["node_embedding"] = emb["node_embedding"].detach().double().requires_grad_()
        return head, emb
    if "sphere_values" in emb:
        emb["sphere_values"] = emb["sphere_values"].double().requires_grad_()
        emb["sphere_points"] = emb["sphere_points"].detach().double()
        return head, emb
    node = emb["node_embedding"]
    node.embedding, node.dtype = node.embedding.double().requires_grad_(), torch.float64
    emb["graph"].edge_distance = emb["graph"].edge_distance.double().requires_grad_()
    for rotation in model.backbone.SO3_rotation:
        rotation.wigner, rotation.wigner_inv = (
            rotation.wigner.double(),
            rotation.wigner_inv.double(),
        )
        rotation.dtype = torch.float64
    return head, emb


def inputs_of(emb: dict) -> list[torch.Tensor]:
    """What the head reads from the backbone: node (or sphere-point) values, edge embeddings."""
    if "sphere_values" in emb:
        return [emb["sphere_values"]]
    if isinstance(emb["node_embedding"], torch.Tensor):
        return [emb["node_embedding"]]
    return [emb["node_embedding"].embedding, emb["graph"].edge_distance]


def run_head(head, batch, emb, only_corrupted: bool):
    """Noise output and the gradients of a weighted sum of its corrupted rows with respect to the
    head's inputs and parameters."""
    head.only_corrupted = only_corrupted
    noise = head(batch, emb)[keys.NOISE_OUTPUT]
    mask = batch[keys.DENS_MASK]
    weights = torch.linspace(-1.0, 2.0, 3 * int(mask.sum()), dtype=noise.dtype).view(-1, 3)
    objective = (noise[mask] * weights).sum()
    wrt = inputs_of(emb) + list(head.parameters())
    grads = torch.autograd.grad(objective, wrt, retain_graph=True, allow_unused=True)
    return noise, [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads, strict=True)]


@pytest.mark.parametrize(
    ("kind", "checkpointing"),
    # eSCN's and eSEN's heads have no activation checkpointing
    [(EQV2, False), (EQV2, True), (ESCN, False), (ESEN, False)],
    ids=["equiformer_v2", "equiformer_v2_activation_checkpoint", "escn", "esen"],
)
def test_reduced_head_equals_full_head_on_corrupted_atoms(kind, checkpointing):
    extra = {"activation_checkpoint": True} if checkpointing else {}
    model = build(kind, **extra).train()
    batch = dens_batch()
    head, emb = head_and_embedding_float64(model, batch)
    full, full_grads = run_head(head, batch, emb, only_corrupted=False)
    reduced, reduced_grads = run_head(head, batch, emb, only_corrupted=True)
    mask = batch[keys.DENS_MASK]
    assert 0 < mask.sum() < mask.numel()
    assert full.dtype == torch.float64 and full[mask].abs().max() > 0
    torch.testing.assert_close(reduced[mask], full[mask], rtol=0, atol=1e-6)
    assert torch.equal(reduced[~mask], torch.zeros_like(reduced[~mask]))  # not computed
    for got, expected in zip(reduced_grads, full_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert any(g.abs().max() > 0 for g in full_grads)


def test_eqv2_head_leaves_the_backbone_rotations_and_state_dict_keys_as_fairchem_has_them():
    from fairchem.core.models.equiformer_v2.heads import EqV2VectorHead

    model = build(EQV2)
    batch = dens_batch()
    with torch.no_grad():
        emb = model.backbone(batch)
        num_edges = emb["graph"].edge_index.shape[1]
        model.output_heads["dens_noise"](batch, emb)
    for rotation in model.backbone.SO3_rotation:
        assert rotation.wigner.shape[0] == num_edges
    head = model.output_heads["dens_noise"]
    assert head.state_dict().keys() == EqV2VectorHead(model.backbone).state_dict().keys()


@pytest.mark.parametrize("kind", [EQV2, ESCN, ESEN], ids=["equiformer_v2", "escn", "esen"])
def test_no_corrupted_atom_skips_the_block_but_every_parameter_gets_a_zero_gradient(kind):
    model = build(kind).train()
    head = model.output_heads["dens_noise"]
    calls = []
    getattr(head, BLOCK[kind[0]]).register_forward_hook(lambda *args: calls.append(1))
    batch = dens_batch(fraction=0.0)
    assert not batch[keys.DENS_MASK].any()
    out = model(batch)
    assert calls == []
    noise = out[keys.NOISE_OUTPUT]
    assert noise.shape == (batch.pos.shape[0], 3) and not noise.detach().any()
    noise.sum().backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and not parameter.grad.any(), name
    with torch.no_grad():  # outside autograd: plain zeros
        assert model(batch)[keys.NOISE_OUTPUT].grad_fn is None
    calls.clear()
    model(dens_batch(fraction=0.5))
    assert calls == [1]


@pytest.mark.parametrize("kind", [EQV2, ESCN, ESEN], ids=["equiformer_v2", "escn", "esen"])
@pytest.mark.parametrize("only_corrupted", [True, False])
def test_no_output_and_no_work_without_dens_fields(kind, only_corrupted):
    model = build(kind)
    head = model.output_heads["dens_noise"]
    head.only_corrupted = only_corrupted
    calls = []
    getattr(head, BLOCK[kind[0]]).register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        out = model(random_batch())
    assert keys.NOISE_OUTPUT not in out and "forces" in out
    assert calls == []


@pytest.mark.parametrize("kind", [EQV2, ESEN], ids=["equiformer_v2", "esen"])
def test_reduced_head_is_equivariant(kind: tuple) -> None:
    batch = dens_batch(fraction=0.5)
    assert_equivariant(build(kind), batch, vectors=("forces", keys.NOISE_OUTPUT), tol=1e-4)


def test_esen_head_state_dict_is_the_same_for_both_switch_values() -> None:
    """``only_corrupted`` changes what is computed, never the weights: the same state-dict names
    (and shapes) either way, so a checkpoint loads whichever way the head runs."""
    reduced = build(ESEN).output_heads["dens_noise"].state_dict()
    torch.manual_seed(0)
    full = hydra(
        {"model": ESEN[0], **TINY_ESEN},
        {
            **ESEN_EFS_HEADS,
            "dens_noise": {**ESEN_NOISE_HEAD["dens_noise"], "only_corrupted": False},
        },
    ).output_heads["dens_noise"]
    assert full.only_corrupted is False
    assert list(full.state_dict()) == list(reduced)
    for name, value in full.state_dict().items():
        assert torch.equal(value, reduced[name]), name  # one random stream: the same weights


@pytest.mark.parametrize("head", [EqV2NoiseHead, eSCNNoiseHead, eSENNoiseHead])
def test_bad_only_corrupted_value_is_a_one_line_error(head):
    with pytest.raises(ValueError, match=r"only_corrupted='no': must be true or false") as error:
        head(None, only_corrupted="no")
    assert "\n" not in str(error.value)
