"""The DeNS-only marker and paired initialisation: building the DeNS modules does not move the
parent's random stream, so the same seed gives the parent's weights in a DeNS model."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    EQV2_HEADS,
    ESCN_HEADS,
    ESCN_NOISE_HEAD,
    NOISE_HEAD,
    TINY_EQV2,
    TINY_ESCN,
    hydra,
)

from fairchem_dens.dens_only import (
    dens_only_modules,
    dens_only_parameters,
    is_dens_only,
    separate_rng,
)
from fairchem_dens.force_encoding import ForceEncoding, SigmaEncoding

FAMILIES = {
    "equiformer_v2": (
        "equiformer_v2_backbone",
        "fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone",
        TINY_EQV2,
        EQV2_HEADS,
        NOISE_HEAD,
    ),
    "escn": (
        "escn_backbone",
        "fairchem_dens.models.escn.DeNSeSCNBackbone",
        TINY_ESCN,
        ESCN_HEADS,
        ESCN_NOISE_HEAD,
    ),
}


def _build(seed: int, backbone: str, arguments: dict, heads: dict) -> torch.nn.Module:
    torch.manual_seed(seed)
    return hydra({"model": backbone, **arguments}, heads)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("noise_head_first", [False, True])
@pytest.mark.parametrize("switches", [{}, {"use_sigma_encoding": True}])
def test_dens_model_starts_at_the_parent_weights(family, noise_head_first, switches):
    parent_name, dens_name, arguments, heads, noise_head = FAMILIES[family]
    parent = _build(7, parent_name, arguments, heads)
    dens_heads = {**noise_head, **heads} if noise_head_first else {**heads, **noise_head}
    dens = _build(7, dens_name, {**arguments, **switches}, dens_heads)
    parent_state, dens_state = parent.state_dict(), dens.state_dict()
    assert set(parent_state) < set(dens_state)
    for name, value in parent_state.items():
        assert torch.equal(value, dens_state[name]), name
    # and the random stream after construction is the parent's too (later draws are paired)
    torch.manual_seed(7)
    hydra({"model": parent_name, **arguments}, heads)
    after_parent = torch.rand(4)
    torch.manual_seed(7)
    hydra({"model": dens_name, **arguments, **switches}, dens_heads)
    assert torch.equal(torch.rand(4), after_parent)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dens_weights_depend_on_the_seed(family):
    _, dens_name, arguments, heads, noise_head = FAMILIES[family]
    first = _build(1, dens_name, arguments, {**heads, **noise_head})
    again = _build(1, dens_name, arguments, {**heads, **noise_head})
    other = _build(2, dens_name, arguments, {**heads, **noise_head})
    encoding = "backbone.force_encoding.weight"
    assert torch.equal(first.state_dict()[encoding], again.state_dict()[encoding])
    assert not torch.equal(first.state_dict()[encoding], other.state_dict()[encoding])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_marker_finds_exactly_the_dens_modules(family):
    _, dens_name, arguments, heads, noise_head = FAMILIES[family]
    model = _build(0, dens_name, {**arguments, "use_sigma_encoding": True}, {**heads, **noise_head})
    found = dens_only_modules(model)
    names = {name for name, module in model.named_modules() if any(module is f for f in found)}
    assert names == {
        "backbone.force_encoding",
        "backbone.sigma_encoding",
        "output_heads.dens_noise",
    }
    head_parameters = sum(p.numel() for p in model.output_heads["dens_noise"].parameters())
    encoding_parameters = sum(
        p.numel()
        for m in (model.backbone.force_encoding, model.backbone.sigma_encoding)
        for p in m.parameters()
    )
    assert sum(p.numel() for p in dens_only_parameters(model)) == (
        head_parameters + encoding_parameters
    )
    assert not any(is_dens_only(m) for m in model.backbone.modules() if m not in found)


def test_separate_rng_restores_the_global_stream():
    torch.manual_seed(3)
    expected = torch.rand(5)
    torch.manual_seed(3)
    with separate_rng("x"):
        ForceEncoding(2, 4)
        SigmaEncoding(4)
    assert torch.equal(torch.rand(5), expected)
