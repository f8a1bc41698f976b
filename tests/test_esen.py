"""Force-encoding eSEN (Eq. 5) with its noise head: energy-conserving forces are −∂E/∂r and stress
is (1/V)·∂E/∂ε (central finite differences in float64), energy is invariant and forces, noise and
stress rotate with the structure, the model without DeNS (or with nothing corrupted) is bitwise
fairchem's eSEN, the force input changes the energy but never writes into ``forces``, and a DeNS
eSEN checkpoint predicts identically in fairchem's plain eSEN."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from e3nn import o3
from fairchem.core.common.utils import radius_graph_pbc
from helpers import (
    ESEN_DIRECT_HEADS,
    ESEN_EFS_HEADS,
    ESEN_NOISE_HEAD,
    TINY_ESEN,
    assert_equivariant,
    hydra,
    random_batch,
    rotate_batch,
    trainer_from_config,
    with_dens_fields,
)
from test_inference import assert_same_predictions, predict, tiny_run, train
from torch_geometric.data import Batch, Data

from fairchem_dens import keys

DENS_BACKBONE = "fairchem_dens.models.esen.DeNSeSENBackbone"
PARENT_BACKBONE = "esen_backbone"
#: DeNS float fields cast with the model in the float64 tests
DENS_FLOATS = (keys.DENS_FORCE_INPUT, keys.DENS_SIGMA, keys.DENS_TARGET)
HEADS = {"conserving": ESEN_EFS_HEADS, "direct": ESEN_DIRECT_HEADS}


def build(
    backbone: str = DENS_BACKBONE,
    heads: str = "conserving",
    noise: bool = True,
    **args: Any,
) -> torch.nn.Module:
    """A tiny eSEN HydraModel (eval) from seed 0; conserving heads regress stress."""
    if heads == "conserving":
        args.setdefault("regress_stress", True)
    torch.manual_seed(0)
    return hydra(
        {"model": backbone, **TINY_ESEN, **args},
        {**HEADS[heads], **(ESEN_NOISE_HEAD if noise else {})},
    )


def outputs(model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """Outputs on a copy of ``batch`` (eSEN writes into its input), with the random edge frames
    of ``init_edge_rot_mat`` drawn from a fixed seed, detached."""
    torch.manual_seed(1)
    return {k: v.detach() for k, v in model(batch.clone()).items()}


def dens_float64(batch: Batch) -> Batch:
    """``batch`` with DeNS fields (half the atoms corrupted), every float field in float64."""
    batch = with_dens_fields(batch, seed=4, corrupted_fraction=0.5)
    for name in DENS_FLOATS:
        batch[name] = batch[name].double()
    return batch


# ---- float64 structures for finite differences -------------------------------------------------


def periodic_float64() -> Batch:
    """Two small periodic cells (3.6 Å boxes, 5 Å cutoff: atoms see their periodic images) with
    the neighbour list built once, so eSEN reads distances from positions, cell and cell offsets
    in float64 (fairchem's on-the-fly PBC graph is float32 only)."""
    batch = random_batch((4, 3), seed=2)
    batch.pos, batch.cell = batch.pos * 0.6, batch.cell * 0.6
    edge_index, cell_offsets, nedges = radius_graph_pbc(batch, 5.0, 12, False)
    assert (batch.batch[edge_index[1]].diff() >= 0).all()  # edges grouped by structure
    assert cell_offsets.abs().sum() > 0  # image neighbours: the cell term of the virial counts
    batch.edge_index, batch.cell_offsets, batch.nedges = edge_index, cell_offsets, nedges
    batch.atomic_numbers_full, batch.batch_full = batch.atomic_numbers, batch.batch
    batch.pos, batch.cell = batch.pos.double(), batch.cell.double()
    return batch


def molecules_float64() -> Batch:
    """Two small molecules (not periodic: torch-cluster's radius graph, the cell unused), atoms
    at least 1 Å apart."""
    generator = torch.Generator().manual_seed(0)
    structures = []
    for n in (4, 5):
        while True:
            pos = torch.rand(n, 3, generator=generator, dtype=torch.float64) * 3.0
            if torch.pdist(pos).min() > 1.0:
                break
        structures.append(
            Data(
                pos=pos,
                cell=torch.eye(3, dtype=torch.float64).unsqueeze(0) * 20.0,
                atomic_numbers=torch.tensor([1.0, 6.0, 8.0, 29.0, 78.0][:n]),
                natoms=n,
                pbc=torch.tensor([[False, False, False]]),
                fixed=torch.zeros(n),
                tags=torch.ones(n, dtype=torch.long),
            )
        )
    return Batch.from_data_list(structures)


GEOMETRIES = {"periodic": periodic_float64, "molecules": molecules_float64}


def energies(
    model: torch.nn.Module, batch: Batch, pos: torch.Tensor, cell: torch.Tensor
) -> torch.Tensor:
    """(n_structures,) energies of ``batch`` moved to ``pos`` and ``cell``."""
    changed = batch.clone()
    changed.pos, changed.cell = pos, cell
    return outputs(model, changed)["energy"]


@pytest.mark.parametrize(
    ("geometry", "dens"),
    [("periodic", False), ("periodic", True), ("molecules", True)],
    ids=["periodic", "periodic_encoded_forces", "molecules_encoded_forces"],
)
def test_conserving_forces_and_stress_are_energy_derivatives(geometry: str, dens: bool) -> None:
    """F = −∂E/∂r and σ = (1/V)·∂E/∂ε (symmetric strain ε of positions and cell, periodic cells),
    by central differences in float64 along random directions of all coordinates (resp. random
    symmetric strains); the encoded forces are a constant input, so this holds with DeNS fields."""
    periodic = geometry == "periodic"
    model = build(otf_graph=not periodic, use_pbc=periodic, regress_stress=periodic).double()
    batch = GEOMETRIES[geometry]()
    if dens:
        batch = dens_float64(batch)
    out = outputs(model, batch)
    assert out["energy"].dtype == out["forces"].dtype == torch.float64
    if dens:
        assert keys.NOISE_OUTPUT in out and out[keys.NOISE_OUTPUT].dtype == torch.float64

    # Directional derivatives along random directions d of all coordinates at once:
    # −dE(r + t·d)/dt = Σ_i F_i·d_i (a wrong sign, a missing term or a wrong atom changes it)
    step = 1e-4  # Å; the O(step²) error is ~1e-8 of the forces here, round-off ~1e-12
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = torch.randn(batch.pos.shape, generator=generator, dtype=torch.float64)
        plus = energies(model, batch, batch.pos + step * direction, batch.cell)
        minus = energies(model, batch, batch.pos - step * direction, batch.cell)
        finite = -(plus - minus) / (2 * step)  # per structure
        analytic = torch.zeros_like(finite).index_add_(
            0, batch.batch, (out["forces"] * direction).sum(-1)
        )
        scale = (out["forces"].abs() * direction.abs()).sum()
        assert scale > 1e-2
        torch.testing.assert_close(analytic, finite, rtol=0, atol=1e-6 * scale)

    if not periodic:
        assert "stress" not in out
        return
    # dE/dt under the symmetric strain t·S of positions and cell = V Σ_ab σ_ab S_ab
    volume = torch.linalg.det(batch.cell).abs()
    stress = out["stress"].view(-1, 3, 3)
    I = torch.eye(3, dtype=torch.float64)  # noqa: E741
    for _ in range(3):
        strain = torch.randn(3, 3, generator=generator, dtype=torch.float64)
        strain = 0.5 * (strain + strain.T)  # eSEN symmetrises its displacement
        deform_plus, deform_minus = I + step * strain, I - step * strain
        plus = energies(model, batch, batch.pos @ deform_plus, batch.cell @ deform_plus)
        minus = energies(model, batch, batch.pos @ deform_minus, batch.cell @ deform_minus)
        finite = (plus - minus) / (2 * step) / volume
        analytic = (stress * strain).sum((-1, -2))
        scale = (stress.abs() * strain.abs()).sum((-1, -2)).max()
        assert scale > 1e-4
        torch.testing.assert_close(analytic, finite, rtol=0, atol=1e-5 * scale)


# ---- equivariance (float32, the training configuration) ----------------------------------------


def assert_stress_rotates(model: torch.nn.Module, batch: Batch, trials: int = 3) -> None:
    """σ(R·structure) = R σ Rᵀ for random rotations R (float32, 1e-4 of the scale)."""
    torch.manual_seed(0)
    reference = outputs(model, batch)["stress"].view(-1, 3, 3)
    scale = reference.abs().max()
    assert scale > 0
    for _ in range(trials):
        rotation = o3.rand_matrix()
        rotated = outputs(model, rotate_batch(batch, rotation))["stress"].view(-1, 3, 3)
        expected = rotation @ reference @ rotation.T
        assert (rotated - expected).abs().max() / scale < 1e-4


@pytest.mark.parametrize("dens", [False, True], ids=["plain_batch", "encoded_forces"])
@pytest.mark.parametrize("heads", sorted(HEADS))
def test_esen_dens_is_equivariant(heads: str, dens: bool) -> None:
    """Energy invariant; forces and noise (and stress, conserving) rotate with positions, cell
    and encoded forces."""
    model = build(heads=heads)
    batch = random_batch()
    vectors: tuple[str, ...] = ("forces",)
    if dens:
        batch = with_dens_fields(batch, seed=2, corrupted_fraction=0.5)
        vectors += (keys.NOISE_OUTPUT,)
    assert_equivariant(model, batch.clone(), vectors=vectors, tol=1e-4)
    if heads == "conserving":
        assert_stress_rotates(model, batch)


# ---- without DeNS: fairchem's eSEN, bit for bit -------------------------------------------------


def parent_with_dens_weights(heads: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The DeNS model and fairchem's eSEN with the DeNS model's state dict (strict=False): the
    only keys the parent lacks are the force encoding's and the noise head's."""
    model = build(heads=heads)
    parent = build(PARENT_BACKBONE, heads=heads, noise=False)
    missing, unexpected = parent.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert unexpected
    assert all(
        k.startswith(("backbone.force_encoding", "output_heads.dens_noise")) for k in unexpected
    )
    return model, parent


@pytest.mark.parametrize("corrupted", [None, 0.0], ids=["no_dens_fields", "nothing_corrupted"])
@pytest.mark.parametrize("heads", sorted(HEADS))
def test_esen_without_corruption_is_bitwise_the_parent(heads: str, corrupted: float | None) -> None:
    """No DeNS fields, or DeNS fields with no corrupted atom (zero force input): energy, forces
    (and stress) are exactly fairchem's eSEN's with the same weights."""
    model, parent = parent_with_dens_weights(heads)
    batch = random_batch()
    if corrupted is not None:
        batch = with_dens_fields(batch, corrupted_fraction=corrupted)
        assert not batch[keys.DENS_MASK].any() and not batch[keys.DENS_FORCE_INPUT].any()
    ours, theirs = outputs(model, batch), outputs(parent, batch)
    names = {"energy", "forces"} | ({"stress"} if heads == "conserving" else set())
    assert set(theirs) == names
    assert set(ours) == names | (set() if corrupted is None else {keys.NOISE_OUTPUT})
    for name in names:
        assert torch.equal(ours[name], theirs[name]), name
    if corrupted is not None:
        assert not ours[keys.NOISE_OUTPUT].any()


@pytest.mark.parametrize("heads", sorted(HEADS))
def test_dens_esen_starts_at_the_parent_weights(heads: str) -> None:
    """The same seed gives the DeNS model the parent's weights (its own modules are drawn from a
    separate random stream), so a paired DeNS/plain comparison starts from one model."""
    model = build(heads=heads).state_dict()
    parent = build(PARENT_BACKBONE, heads=heads, noise=False).state_dict()
    assert parent.keys() <= model.keys()
    for name, value in parent.items():
        assert torch.equal(model[name], value), name


# ---- the force input ---------------------------------------------------------------------------


@pytest.mark.parametrize("heads", sorted(HEADS))
def test_force_input_changes_the_energy_by_magnitude_and_direction(heads: str) -> None:
    """Encoded forces change energy and forces (finite); rotating only the force input (not the
    structure) changes the energy too: the encoding reads the direction, not only |f|."""
    model = build(heads=heads)
    batch = random_batch()
    dens = with_dens_fields(batch, seed=2, corrupted_fraction=0.5)
    out, plain = outputs(model, dens), outputs(model, batch)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out[keys.NOISE_OUTPUT].shape == (batch.pos.shape[0], 3)
    assert (out["energy"] - plain["energy"]).abs().min() > 1e-4
    assert (out["forces"] - plain["forces"]).abs().max() > 1e-4
    turned = dens.clone()
    turned[keys.DENS_FORCE_INPUT] = dens[keys.DENS_FORCE_INPUT] @ o3.rand_matrix().T
    assert (outputs(model, turned)["energy"] - out["energy"]).abs().max() > 1e-4


@pytest.mark.parametrize("heads", sorted(HEADS))
def test_noise_is_never_written_into_forces(heads: str) -> None:
    """Energy and forces of a DeNS batch are those of the same model without its noise head, and
    do not move when the noise head's weights do (the noise is its own output)."""
    model = build(heads=heads)
    without = build(heads=heads, noise=False)
    missing, unexpected = without.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("output_heads.dens_noise") for k in unexpected)
    batch = with_dens_fields(random_batch(), seed=2, corrupted_fraction=0.5)
    out, reference = outputs(model, batch), outputs(without, batch)
    assert not torch.allclose(out["forces"], out[keys.NOISE_OUTPUT])
    with torch.no_grad():
        for parameter in model.output_heads["dens_noise"].parameters():
            parameter.mul_(-2.0)
    changed = outputs(model, batch)
    assert not torch.allclose(changed[keys.NOISE_OUTPUT], out[keys.NOISE_OUTPUT])
    for name in set(reference):
        assert torch.equal(out[name], reference[name]), name
        assert torch.equal(changed[name], reference[name]), name


# ---- checkpoints -------------------------------------------------------------------------------


def esen_dens_run(data: Path) -> dict[str, Any]:
    """The 2-step tiny run of tests/test_inference.py with a conserving DeNS eSEN; the forces
    normaliser is the energy's (F/σ_E = −∂(E/σ_E)/∂r)."""
    config = tiny_run(data, prob=0.5)
    config["model"]["backbone"] = {
        "model": DENS_BACKBONE,
        "use_force_encoding": True,
        **TINY_ESEN,
    }
    config["model"]["heads"] = {**ESEN_EFS_HEADS, **ESEN_NOISE_HEAD}
    normalizer = config["dataset"]["train"]["transforms"]["normalizer"]
    normalizer["forces"] = {"mean": 0.0, "rmsd": normalizer["energy"]["rmsd"]}
    config["dataset"]["test"] = {
        "src": str(data / "oc20" / "test"),
        "test_split_settings": {"first_n": 6},
    }
    return config


def test_dens_esen_checkpoint_runs_in_the_plain_esen(
    emt_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A trained DeNS eSEN checkpoint in fairchem's plain eSEN (``esen_backbone`` +
    ``esen_mlp_efs_head``): the DeNS modules are dropped and reported by name in one line, and
    the energies and gradient forces predicted are exactly the DeNS model's."""
    config = esen_dens_run(emt_data)
    checkpoint = train(config, tmp_path / "train")
    with trainer_from_config(copy.deepcopy(config), tmp_path / "dens") as trainer:
        trainer.load_checkpoint(str(checkpoint))
        assert trainer.gradient_forces
        expected = predict(trainer, trainer.test_loader)
    config["model"]["backbone"] = {"model": PARENT_BACKBONE, **TINY_ESEN}
    config["model"]["heads"] = copy.deepcopy(ESEN_EFS_HEADS)
    del config["optim"]["dens"]  # the plain model predicts; DeNS needs a force-encoding backbone
    with trainer_from_config(config, tmp_path / "plain") as trainer:
        with caplog.at_level(logging.INFO):
            trainer.load_checkpoint(str(checkpoint))
        lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        assert len(lines) == 1
        assert "backbone.force_encoding.*" in lines[0] and "output_heads.dens_noise.*" in lines[0]
        got = predict(trainer, trainer.test_loader)
    assert len(got["ids"]) == 6 and abs(got["forces"]).max() > 0
    assert_same_predictions(got, expected)
