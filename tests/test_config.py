"""Validation of ``optim.dens``: every wrong value stops with one line naming key and value."""

from __future__ import annotations

import pytest

from fairchem_dens.config import DeNSConfig, DeNSConfigError

BAD_VALUES = [
    ("prob", 1.5),
    ("prob", -0.1),
    ("prob", "half"),
    ("corrupt_ratio", 2),
    ("sigma", 0.0),
    ("sigma", -0.1),
    ("sigma_low", 0.0),
    ("sigma_high", -1.0),
    ("num_sigmas", 1),
    ("num_sigmas", 2.5),
    ("coefficient", -1),
    ("coefficient", float("nan")),
    ("coefficient_floor", 1.5),
    ("candidates", "fixed"),
    ("schedule", "cosine"),
    ("loss", "huber"),
    ("energy_on_dens", "yes"),
    ("max_force_norm", 0),
    ("min_num_atoms", 0),
    ("max_corrupted_ratio", 0),
    ("epochs", [3, 1]),
    ("epochs", 4),
    ("seed", 1.5),
    ("max_stress_norm", 0),
    ("max_stress_norm", "1 GPa"),
    ("skip_flag", ""),
    ("skip_flag", 3),
    ("skip_list", "no/such/file.txt"),
    ("energy_targets", "energy"),
    ("energy_targets", ["energy", 1]),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_bad_value_names_key_and_value(key, value):
    with pytest.raises(DeNSConfigError) as error:
        DeNSConfig.from_optim({"dens": {key: value}})
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"optim.dens.{key}=")


def test_sigma_low_must_be_below_sigma_high():
    with pytest.raises(DeNSConfigError, match=r"optim\.dens\.sigma_low=0\.5: must be < sigma_high"):
        DeNSConfig.from_optim({"dens": {"sigma_low": 0.5, "sigma_high": 0.5}})
    # a fixed σ does not use the grid
    assert DeNSConfig.from_optim({"dens": {"sigma": 0.1, "sigma_low": 0.5, "sigma_high": 0.5}})


def test_unknown_key_is_an_error():
    with pytest.raises(DeNSConfigError, match=r"optim\.dens\.std_high: unknown DeNS key"):
        DeNSConfig.from_optim({"dens": {"std_high": 0.5}})


def test_absent_or_disabled_section_means_no_dens():
    assert DeNSConfig.from_optim({}) is None
    assert DeNSConfig.from_optim({"dens": {"enabled": False}}) is None
    config = DeNSConfig.from_optim({"dens": {"prob": 0.25, "epochs": [0, 2]}})
    assert config.prob == 0.25 and config.epochs == (0, 2) and config.multi_scale


def test_linear_schedule_decays_to_floor():
    config = DeNSConfig(coefficient=10.0, schedule="linear", coefficient_floor=0.2)
    assert config.coefficient_at(0, 100) == pytest.approx(10.0)
    assert config.coefficient_at(50, 100) == pytest.approx(6.0)
    assert config.coefficient_at(100, 100) == pytest.approx(2.0)
    assert config.coefficient_at(150, 100) == pytest.approx(2.0)
    assert DeNSConfig(coefficient=10.0).coefficient_at(50, 100) == 10.0


def test_epoch_window():
    config = DeNSConfig(epochs=(1, 3))
    assert [config.active_in_epoch(e) for e in range(5)] == [False, True, True, False, False]
