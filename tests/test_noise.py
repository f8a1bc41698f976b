"""Statistics of the corruption (Alg. 1 l.7-23, Eq. 2, Eq. 7) on many simulated structures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fairchem_dens.config import DeNSConfig
from fairchem_dens.noise import Status, draw_corruption, sigma_grid, stress_norm, structure_rng

N_STRUCTURES = 3000
N_ATOMS = 20
N_FIXED = 6


def within_binomial(successes: int, trials: int, p: float, z: float = 5.0) -> bool:
    """True when ``successes`` is within z standard deviations of Binomial(trials, p)'s mean."""
    return abs(successes - trials * p) <= z * math.sqrt(trials * p * (1 - p)) + 1e-9


def draw_many(config: DeNSConfig, seed: int = 0, epoch: int = 0, forces=None):
    candidates = np.arange(N_ATOMS) >= N_FIXED  # the first N_FIXED atoms are fixed
    return [
        draw_corruption(config, structure_rng(seed, epoch, i), candidates, forces)
        for i in range(N_STRUCTURES)
    ]


def test_sigma_grid_is_eq7_geometric_progression():
    grid = sigma_grid(0.01, 0.5, 50)
    assert grid.shape == (50,)
    assert grid[0] == pytest.approx(0.01) and grid[-1] == pytest.approx(0.5)
    ratios = grid[1:] / grid[:-1]
    assert np.allclose(ratios, ratios[0]) and ratios[0] > 1
    assert ratios[0] == pytest.approx((0.5 / 0.01) ** (1 / 49))


@pytest.fixture(scope="module")
def multi_scale_draws():
    config = DeNSConfig(prob=0.3, sigma_high=0.5, corrupt_ratio=0.5)
    return config, draw_many(config)


def test_dens_fraction_matches_p_dens(multi_scale_draws):
    config, draws = multi_scale_draws
    drawn = sum(d.status in (Status.DENS, Status.NO_ATOM) for d in draws)
    assert within_binomial(drawn, N_STRUCTURES, config.prob)


def test_sigmas_lie_on_grid_and_cover_it(multi_scale_draws):
    config, draws = multi_scale_draws
    grid = sigma_grid(config.sigma_low, config.sigma_high, config.num_sigmas)
    sigmas = np.array([d.sigma for d in draws if d.status == Status.DENS])
    index = np.abs(sigmas[:, None] - grid[None, :]).argmin(1)
    assert np.allclose(sigmas, grid[index], rtol=1e-12)
    assert set(index.tolist()) == set(range(config.num_sigmas))  # every σ_k is drawn
    counts = np.bincount(index, minlength=config.num_sigmas)
    assert all(within_binomial(c, len(sigmas), 1 / config.num_sigmas) for c in counts)


def test_corrupted_fraction_matches_r_dens_and_fixed_atoms_untouched(multi_scale_draws):
    config, draws = multi_scale_draws
    dens = [d for d in draws if d.status == Status.DENS]
    masks = np.stack([d.mask for d in dens])
    assert not masks[:, :N_FIXED].any()  # fixed atoms are never corrupted
    noise = np.stack([d.noise for d in dens])
    assert np.all(noise[:, :N_FIXED] == 0) and np.all(noise[~masks] == 0)
    corrupted = int(masks[:, N_FIXED:].sum())
    trials = masks[:, N_FIXED:].size
    # conditioned on at least one corrupted atom the rate is slightly above r; (1-r)^14 ≈ 6e-5
    assert within_binomial(corrupted, trials, config.corrupt_ratio)


def test_normalised_noise_has_unit_variance(multi_scale_draws):
    _, draws = multi_scale_draws
    scaled = np.concatenate([d.noise[d.mask] / d.sigma for d in draws if d.status == Status.DENS])
    n = scaled.size
    assert abs(scaled.mean()) < 5 / math.sqrt(n)
    assert abs(scaled.var() - 1.0) < 5 * math.sqrt(2 / n)


def test_original_structures_are_untouched(multi_scale_draws):
    _, draws = multi_scale_draws
    for d in draws:
        if d.status != Status.DENS:
            assert d.sigma == 0 and not d.mask.any() and not d.noise.any()


def test_r_dens_one_corrupts_every_candidate_and_fixed_sigma():
    config = DeNSConfig(prob=1.0, sigma=0.1, corrupt_ratio=1.0)
    draws = draw_many(config)
    assert all(d.status == Status.DENS for d in draws)
    assert all(d.sigma == 0.1 for d in draws)
    masks = np.stack([d.mask for d in draws])
    assert masks[:, N_FIXED:].all() and not masks[:, :N_FIXED].any()


def test_all_atoms_candidates_in_oc22_mode():
    config = DeNSConfig(prob=1.0, corrupt_ratio=0.5, candidates="all")
    candidates = np.ones(N_ATOMS, bool)
    masks = np.stack(
        [draw_corruption(config, structure_rng(1, 0, i), candidates).mask for i in range(500)]
    )
    assert masks[:, :N_FIXED].any()
    assert within_binomial(int(masks.sum()), masks.size, 0.5)


def test_no_corrupted_atom_falls_back_to_original_task():
    config = DeNSConfig(prob=1.0, corrupt_ratio=0.01)
    draws = draw_many(config)
    no_atom = [d for d in draws if d.status == Status.NO_ATOM]
    assert no_atom and all(not d.mask.any() and d.sigma == 0 for d in no_atom)


def test_draw_depends_only_on_seed_epoch_index():
    config = DeNSConfig(prob=1.0, corrupt_ratio=0.5)
    candidates = np.ones(N_ATOMS, bool)

    def draw(seed, epoch, index):
        return draw_corruption(config, structure_rng(seed, epoch, index), candidates)

    a, b = draw(3, 1, 17), draw(3, 1, 17)
    assert a.status == b.status and np.array_equal(a.noise, b.noise)
    others = [draw(3, 2, 17), draw(4, 1, 17), draw(3, 1, 18)]
    assert all(not np.array_equal(a.noise, o.noise) for o in others)


def test_filters_make_structures_ineligible():
    forces = np.zeros((N_ATOMS, 3))
    forces[N_FIXED + 1, 0] = 3.0  # a free atom at 3 eV/Å
    config = DeNSConfig(prob=1.0, max_force_norm=2.5)
    assert {d.status for d in draw_many(config, forces=forces)} == {Status.MAX_FORCE}
    forces[N_FIXED + 1, 0] = 2.0
    assert {d.status for d in draw_many(config, forces=forces)} == {Status.DENS}
    forces[0, 0] = 100.0  # a fixed atom is no candidate: ignored by the filter
    assert {d.status for d in draw_many(config, forces=forces)} == {Status.DENS}

    config = DeNSConfig(prob=1.0, min_num_atoms=N_ATOMS - N_FIXED + 1)
    assert {d.status for d in draw_many(config)} == {Status.MIN_ATOMS}

    config = DeNSConfig(prob=1.0, corrupt_ratio=0.5, max_corrupted_ratio=0.6)
    draws = draw_many(config)
    for d in draws:
        if d.status == Status.DENS:
            assert d.mask.sum() <= 0.6 * (N_ATOMS - N_FIXED)
    assert any(d.status == Status.MAX_RATIO for d in draws)


def test_opt_out_is_never_corrupted_and_draws_nothing():
    config = DeNSConfig(prob=1.0, sigma=0.1)
    candidates = np.ones(N_ATOMS, dtype=bool)
    for i in range(200):
        draw = draw_corruption(config, structure_rng(0, 0, i), candidates, opt_out=True)
        assert draw.status == Status.OPT_OUT and not draw.mask.any() and not draw.noise.any()
    rng = structure_rng(0, 0, 7)
    draw_corruption(config, rng, candidates, opt_out=True)
    assert rng.random() == structure_rng(0, 0, 7).random()  # the generator was not advanced


def test_max_stress_norm_uses_the_frobenius_norm():
    """σ = diag(a, a, a) has ‖σ‖_F = √3 a; filtered exactly above the threshold."""
    config = DeNSConfig(prob=1.0, sigma=0.1, max_stress_norm=0.01)  # eV/Å³
    candidates = np.ones(N_ATOMS, dtype=bool)
    assert stress_norm(np.eye(3) * 0.01) == pytest.approx(0.01 * math.sqrt(3))
    for scale, status in ((0.0057, Status.DENS), (0.0058, Status.MAX_STRESS)):
        draw = draw_corruption(config, structure_rng(0, 0, 1), candidates, stress=np.eye(3) * scale)
        assert draw.status == status, scale
    with pytest.raises(ValueError, match="max_stress_norm needs the structure's stress"):
        draw_corruption(config, structure_rng(0, 0, 1), candidates)
