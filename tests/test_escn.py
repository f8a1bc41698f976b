"""Force-encoding eSCN (Eq. 5) and its per-sphere-point noise head: equivariance, exact parent
behaviour without DeNS, no NaN for zero forces, and the noise head's parameter overhead."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ESCN_HEADS,
    ESCN_NOISE_HEAD,
    TINY_ESCN,
    assert_equivariant,
    demo_config,
    hydra,
    random_batch,
    run_cli,
    tiny_config,
    with_dens_fields,
    write_config,
)

from fairchem_dens import keys

DENS_BACKBONE = "fairchem_dens.models.escn.DeNSeSCNBackbone"


def dens_escn(**switches):
    torch.manual_seed(0)
    return hydra(
        {"model": DENS_BACKBONE, **TINY_ESCN, **switches}, {**ESCN_HEADS, **ESCN_NOISE_HEAD}
    )


def test_escn_dens_is_equivariant_with_and_without_force_input():
    model = dens_escn()
    # eSCN's outputs are sums over a finite set of sphere points, so equivariance holds to the
    # sampling error of its own parent (measured up to 9e-4 relative at 1024 points): tol 5e-3
    assert_equivariant(
        model, with_dens_fields(random_batch()), vectors=("forces", keys.NOISE_OUTPUT), tol=5e-3
    )
    assert_equivariant(model, random_batch(), vectors=("forces",), tol=5e-3)


def test_escn_without_dens_equals_parent_with_same_weights():
    model = dens_escn()
    parent = hydra({"model": "escn_backbone", **TINY_ESCN}, ESCN_HEADS)
    missing, unexpected = parent.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert all(
        k.startswith(("backbone.force_encoding", "output_heads.dens_noise")) for k in unexpected
    )
    batch = random_batch()
    with torch.no_grad():
        ours, theirs = model(batch), parent(batch)
        ours_zero = model(with_dens_fields(batch, corrupted_fraction=0.0))
    assert set(ours) == {"energy", "forces"}
    for name in ("energy", "forces"):
        assert torch.allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-7)
        assert torch.allclose(ours_zero[name], theirs[name], rtol=1e-5, atol=1e-7)


def test_escn_force_input_matters_and_is_finite():
    model = dens_escn()
    batch = random_batch()
    dens_batch = with_dens_fields(batch)
    with torch.no_grad():
        out = model(dens_batch)
        assert all(torch.isfinite(v).all() for v in out.values())
        assert not torch.allclose(out["energy"], model(batch)["energy"])
    assert out[keys.NOISE_OUTPUT].shape == (batch.pos.shape[0], 3)


def test_escn_noise_head_is_the_cheap_sphere_point_block():
    model = dens_escn()
    head = sum(p.numel() for p in model.output_heads["dens_noise"].parameters())
    force = sum(p.numel() for p in model.output_heads["forces"].parameters())
    assert head == force  # the same per-sphere-point block as eSCN's force head


@pytest.mark.slow
def test_escn_dens_trains_through_the_stock_cli(emt_data, tmp_path):
    config = tiny_config(emt_data, prob=0.5)
    config["model"] = demo_config("escn_dens.yml")["model"]
    backbone = config["model"]["backbone"]
    backbone.update({**TINY_ESCN, "num_sphere_samples": 128})
    config["dataset"]["train"]["train_split_settings"] = {"first_n": 24}
    config["optim"].update(print_every=1, eval_every=3)
    config["optim"]["scheduler_params"]["warmup_epochs"] = 0.4
    path = write_config(config, tmp_path / "escn.yml")
    output = run_cli(
        "--mode",
        "train",
        "--config-yml",
        str(path),
        "--cpu",
        "--run-dir",
        str(tmp_path),
        "--print-every",
        "2",
        cwd=tmp_path,
    )
    for term in ("loss_energy", "loss_forces", "loss_dens"):
        assert f"{term}:" in output
    assert next(tmp_path.glob("checkpoints/*/checkpoint.pt")).stat().st_size > 0
