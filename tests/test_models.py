"""Force-encoding EquiformerV2 (Eq. 5) and its noise head: equivariance, exact parent behaviour
without DeNS, no NaN for zero forces, no noise-head work outside DeNS training."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3
from helpers import (
    EQV2_HEADS,
    NOISE_HEAD,
    TINY_EQV2,
    assert_equivariant,
    hydra,
    random_batch,
    with_dens_fields,
)

from fairchem_dens import keys
from fairchem_dens.force_encoding import ForceEncoding

DENS_BACKBONE = "fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone"


def dens_model(**switches):
    torch.manual_seed(0)
    return hydra({"model": DENS_BACKBONE, **TINY_EQV2, **switches}, {**EQV2_HEADS, **NOISE_HEAD})


def test_force_encoding_is_equivariant_per_degree():
    torch.manual_seed(0)
    lmax = 3
    encoding = ForceEncoding(lmax, channels=5)
    forces = torch.randn(10, 3)
    rotation = o3.rand_matrix()
    wigner = o3.Irreps.spherical_harmonics(lmax).D_from_matrix(rotation)  # block diagonal
    out = encoding(forces)
    rotated = encoding(forces @ rotation.T)
    expected = torch.einsum("ij,njc->nic", wigner, out)
    assert torch.allclose(rotated, expected, atol=1e-5)
    # degree 0 carries ‖f‖ times one weight per channel (Eq. 5 with Y^(0) = 1)
    assert torch.allclose(out[:, 0], forces.norm(dim=-1, keepdim=True) * encoding.weight[0])


def test_zero_force_gives_exactly_zero_embedding_and_finite_gradients():
    encoding = ForceEncoding(4, channels=6)
    forces = torch.zeros(3, 3, requires_grad=True)
    out = encoding(forces)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.isfinite(forces.grad).all() and torch.isfinite(encoding.weight.grad).all()


def test_dens_model_is_equivariant_with_force_input():
    model = dens_model()
    batch = with_dens_fields(random_batch())
    assert_equivariant(model, batch, vectors=("forces", keys.NOISE_OUTPUT), tol=1e-4)


def test_dens_model_is_equivariant_without_dens_fields():
    assert_equivariant(dens_model(), random_batch(), vectors=("forces",), tol=1e-4)


def test_without_dens_output_equals_parent_with_same_weights():
    model = dens_model()
    parent = hydra({"model": "equiformer_v2_backbone", **TINY_EQV2}, EQV2_HEADS)
    missing, unexpected = parent.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert sorted(unexpected) == sorted(
        ["backbone.force_encoding.weight"]
        + [k for k in model.state_dict() if k.startswith("output_heads.dens_noise.")]
    )
    batch = random_batch()
    with torch.no_grad():
        ours, theirs = model(batch), parent(batch)
        # a DeNS batch whose forces are all zero (nothing corrupted) sees the parent as well
        zero = with_dens_fields(batch, corrupted_fraction=0.0)
        ours_zero = model(zero)
    assert set(ours) == {"energy", "forces"}  # no noise output outside DeNS
    # fairchem's EquiformerV2 is not bitwise reproducible on CPU (threaded scatter sums differ by
    # ~1e-9 between two calls of the parent itself), so "equal" is within float32 round-off
    for name in ("energy", "forces"):
        assert torch.allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-7)
        assert torch.allclose(ours_zero[name], theirs[name], rtol=1e-5, atol=1e-7)


def test_force_input_changes_outputs_and_switch_disables_it():
    batch = random_batch()
    dens_batch = with_dens_fields(batch)
    with torch.no_grad():
        model = dens_model()
        assert not torch.allclose(model(dens_batch)["energy"], model(batch)["energy"])
        off = dens_model(use_force_encoding=False)  # Table 1e idx 2
        assert off.backbone.force_encoding is None
        assert torch.allclose(off(dens_batch)["energy"], off(batch)["energy"], atol=1e-7)


def test_sigma_encoding_ablation():
    batch = random_batch()
    dens_batch = with_dens_fields(batch)
    model = dens_model(use_force_encoding=False, use_sigma_encoding=True)  # Table 1e idx 5
    with torch.no_grad():
        assert not torch.allclose(model(dens_batch)["energy"], model(batch)["energy"])
        dens_batch[keys.DENS_SIGMA] = torch.zeros_like(dens_batch[keys.DENS_SIGMA])
        assert torch.allclose(model(dens_batch)["energy"], model(batch)["energy"], atol=1e-7)
    assert_equivariant(
        dens_model(use_sigma_encoding=True),
        with_dens_fields(batch),
        vectors=("forces", keys.NOISE_OUTPUT),
    )


def test_noise_head_runs_only_on_dens_batches():
    model = dens_model()
    calls = []
    model.output_heads["dens_noise"].force_block.register_forward_hook(
        lambda *args: calls.append(1)
    )
    with torch.no_grad():
        model(random_batch())
        assert calls == []
        out = model(with_dens_fields(random_batch()))
    assert calls == [1] and out[keys.NOISE_OUTPUT].shape == (12, 3)


def test_bad_switch_value_is_one_line_error():
    with pytest.raises(ValueError, match=r"model\.backbone\.use_force_encoding='yes'"):
        dens_model(use_force_encoding="yes")
