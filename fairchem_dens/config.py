"""The DeNS settings (``optim.dens`` in a fairchem YAML), validated once at start.

fairchem 1.10 passes only known top-level config keys to a trainer, so every DeNS setting lives
under ``optim.dens``. Each field carries the paper's symbol; a wrong value raises
:class:`DeNSConfigError` with one line naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Prefix of every key in error messages.
KEY = "optim.dens"

CANDIDATE_MODES = ("free", "all")
SCHEDULES = ("constant", "linear")
#: Divisor of the Eq. 4 target under multi-scale noise: each structure's own σ (the paper's text)
#: or σ_high (the authors' code behind the paper's multi-scale numbers).
TARGET_SCALES = ("sigma", "sigma_high")


class DeNSConfigError(ValueError):
    """A DeNS config key has a wrong value; the message is one line naming key and value."""


@dataclass(frozen=True)
class DeNSConfig:
    """All DeNS hyper-parameters (paper §3.2.3, Alg. 1, Tables 7-8, App. D.2).

    Lengths are in Å, forces in eV/Å.
    """

    enabled: bool = True
    #: p_DeNS — probability that a structure optimises DeNS (Alg. 1 l.7-8).
    prob: float = 0.5
    #: σ (Å) — fixed noise std (Alg. 1 l.12); ``None`` selects multi-scale noise (Eq. 7).
    sigma: float | None = None
    #: σ_low (Å) — smallest σ of the Eq. 7 grid.
    sigma_low: float = 0.01
    #: σ_high (Å) — largest σ of the Eq. 7 grid.
    sigma_high: float = 0.5
    #: T — number of σ values in the Eq. 7 grid.
    num_sigmas: int = 50
    #: Divisor of the noise target ε (Eq. 4) under multi-scale noise: "sigma" (each structure's
    #: own σ, the paper's text) or "sigma_high" (the authors' code); identical for a fixed σ.
    target_scale: str = "sigma"
    #: r_DeNS — probability that a candidate atom is corrupted (Alg. 1 l.15-16).
    corrupt_ratio: float = 1.0
    #: Candidate atoms: "free" (``fixed == 0``, OC20, App. B.1) or "all" (OC22, App. C.1).
    candidates: str = "free"
    #: λ_DeNS — coefficient of L_DeNS (Eq. 6).
    coefficient: float = 10.0
    #: λ_DeNS schedule: "constant", or "linear" from λ_DeNS to λ_DeNS·floor over the run (App. D.2).
    schedule: str = "constant"
    #: Final λ_DeNS factor of the linear schedule (0 = App. D.2's decay to 0).
    coefficient_floor: float = 0.0
    #: False: λ_E = 0 on DeNS structures (Table 1e idx 3); True: Eq. 6 as written.
    energy_on_dens: bool = True
    #: Loss of the DeNS term, a fairchem loss name ("l2mae", "mse", "mae"); None: the forces' loss.
    loss: str | None = None
    #: Seed of the corruption; None: the run's seed (``cmd.seed``).
    seed: int | None = None
    #: eV/Å: structures whose largest candidate force norm exceeds it are never DeNS structures.
    max_force_norm: float | None = None
    #: eV/Å³ (ASE's and fairchem's stress unit; 1 eV/Å³ = 160.2 GPa): structures whose stress
    #: Frobenius norm exceeds it are never DeNS structures; needs stress labels.
    max_stress_norm: float | None = None
    #: Name of a per-structure data field; structures where it is non-zero are never corrupted
    #: (the DeNS authors' ``md`` flag for OC20's MD frames); None: no flag.
    skip_flag: str | None = "md"
    #: Text file of training-dataset indices (one per line) never corrupted; None: no list.
    skip_list: str | None = None
    #: System-level targets that DeNS structures train (the energy of the original structure,
    #: Eq. 6, subject to ``energy_on_dens``); every other system-level target (stress, rank-2,
    #: any property of the uncorrupted geometry) never trains on a DeNS structure.
    #: None: ``["energy"]``.
    energy_targets: tuple[str, ...] | None = None
    #: Structures with fewer candidate atoms than this are never DeNS structures.
    min_num_atoms: int | None = None
    #: Structures whose drawn corrupted fraction exceeds it fall back to the original task.
    max_corrupted_ratio: float | None = None
    #: [start, end) epoch window in which DeNS is active; None: every epoch.
    epochs: tuple[float, float] | None = field(default=None)

    @property
    def multi_scale(self) -> bool:
        """True when σ is drawn from the Eq. 7 grid, False for a fixed σ."""
        return self.sigma is None

    @classmethod
    def from_optim(cls, optim: dict[str, Any] | None) -> DeNSConfig | None:
        """Read and validate ``optim.dens``; ``None`` when the section is absent or disabled."""
        section = (optim or {}).get("dens")
        if section is None:
            return None
        if not isinstance(section, dict):
            raise DeNSConfigError(f"{KEY}={section!r}: must be a mapping of DeNS settings")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - names)
        if unknown:
            raise DeNSConfigError(
                f"{KEY}.{unknown[0]}: unknown DeNS key (known: {', '.join(sorted(names))})"
            )
        values = dict(section)
        if isinstance(values.get("energy_targets"), list):
            values["energy_targets"] = tuple(values["energy_targets"])
        if values.get("epochs") is not None:
            epochs = values["epochs"]
            if not isinstance(epochs, (list, tuple)) or len(epochs) != 2:
                raise DeNSConfigError(f"{KEY}.epochs={epochs!r}: must be [start, end]")
            values["epochs"] = tuple(epochs)
        config = cls(**values)
        config.validate()
        return config if config.enabled else None

    def validate(self) -> None:
        """Raise :class:`DeNSConfigError` on the first wrong value."""

        def fail(key: str, value: Any, why: str) -> None:
            raise DeNSConfigError(f"{KEY}.{key}={value!r}: {why}")

        def number(key: str, allow_none: bool = False) -> None:
            value = getattr(self, key)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(key, value, "must be a number")
            if not math.isfinite(value):
                fail(key, value, "must be finite")

        for key in ("enabled", "energy_on_dens"):
            if not isinstance(getattr(self, key), bool):
                fail(key, getattr(self, key), "must be true or false")
        for key in ("prob", "corrupt_ratio", "coefficient_floor"):
            number(key)
            if not 0.0 <= getattr(self, key) <= 1.0:
                fail(key, getattr(self, key), "must be in [0, 1]")
        number("sigma", allow_none=True)
        if self.sigma is not None and self.sigma <= 0:
            fail("sigma", self.sigma, "must be > 0 (Å)")
        for key in ("sigma_low", "sigma_high"):
            number(key)
            if getattr(self, key) <= 0:
                fail(key, getattr(self, key), "must be > 0 (Å)")
        if self.sigma is None and not self.sigma_low < self.sigma_high:
            fail("sigma_low", self.sigma_low, f"must be < sigma_high={self.sigma_high!r}")
        if isinstance(self.num_sigmas, bool) or not isinstance(self.num_sigmas, int):
            fail("num_sigmas", self.num_sigmas, "must be an integer")
        if self.num_sigmas < 2:
            fail("num_sigmas", self.num_sigmas, "must be >= 2 (T in Eq. 7)")
        number("coefficient")
        if self.coefficient < 0:
            fail("coefficient", self.coefficient, "must be >= 0 (λ_DeNS)")
        if self.candidates not in CANDIDATE_MODES:
            fail("candidates", self.candidates, f"must be one of {list(CANDIDATE_MODES)}")
        if self.target_scale not in TARGET_SCALES:
            fail("target_scale", self.target_scale, f"must be one of {list(TARGET_SCALES)}")
        if self.schedule not in SCHEDULES:
            fail("schedule", self.schedule, f"must be one of {list(SCHEDULES)}")
        if self.loss is not None and self.loss not in ("l2mae", "l2norm", "mse", "mae"):
            fail("loss", self.loss, "must be one of ['l2mae', 'mse', 'mae'] or null")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            fail("seed", self.seed, "must be an integer or null")
        number("max_force_norm", allow_none=True)
        if self.max_force_norm is not None and self.max_force_norm <= 0:
            fail("max_force_norm", self.max_force_norm, "must be > 0 (eV/Å)")
        number("max_stress_norm", allow_none=True)
        if self.max_stress_norm is not None and self.max_stress_norm <= 0:
            fail("max_stress_norm", self.max_stress_norm, "must be > 0 (eV/Å³)")
        if self.skip_flag is not None and not (isinstance(self.skip_flag, str) and self.skip_flag):
            fail("skip_flag", self.skip_flag, "must be a data field name or null")
        if self.skip_list is not None:
            if not isinstance(self.skip_list, str) or not self.skip_list:
                fail("skip_list", self.skip_list, "must be a file path or null")
            if not Path(self.skip_list).is_file():
                fail("skip_list", self.skip_list, "file not found")
        if self.energy_targets is not None and not (
            isinstance(self.energy_targets, (tuple, list))
            and all(isinstance(name, str) and name for name in self.energy_targets)
        ):
            fail("energy_targets", self.energy_targets, "must be a list of target names")
        if self.min_num_atoms is not None and (
            isinstance(self.min_num_atoms, bool)
            or not isinstance(self.min_num_atoms, int)
            or self.min_num_atoms < 1
        ):
            fail("min_num_atoms", self.min_num_atoms, "must be a positive integer")
        number("max_corrupted_ratio", allow_none=True)
        if self.max_corrupted_ratio is not None and not 0 < self.max_corrupted_ratio <= 1:
            fail("max_corrupted_ratio", self.max_corrupted_ratio, "must be in (0, 1]")
        if self.epochs is not None:
            start, end = self.epochs
            for value in (start, end):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    fail("epochs", list(self.epochs), "must be two numbers >= 0")
            if not start < end:
                fail("epochs", list(self.epochs), "start must be < end")

    @property
    def dens_energy_targets(self) -> tuple[str, ...]:
        """System-level targets DeNS structures train (``energy_targets``, default the energy)."""
        return ("energy",) if self.energy_targets is None else tuple(self.energy_targets)

    def target_divisor(self, sigma: float) -> float:
        """The divisor of ε in the Eq. 4 target ε/σ' for a structure corrupted with ``sigma`` (Å).

        σ' = σ with a fixed σ or ``target_scale: sigma``; σ' = σ_high with multi-scale noise and
        ``target_scale: sigma_high`` (the target then has std σ/σ_high ≤ 1).
        """
        if self.multi_scale and self.target_scale == "sigma_high":
            return float(self.sigma_high)
        return float(sigma)

    def coefficient_at(self, step: int, total_steps: int) -> float:
        """λ_DeNS at global optimizer step ``step`` of ``total_steps`` (App. D.2).

        Computed from the global step only, so a resumed run continues the schedule exactly.
        """
        if self.schedule == "constant" or total_steps <= 0:
            return float(self.coefficient)
        progress = min(max(step / total_steps, 0.0), 1.0)
        return float(self.coefficient) * (1.0 - (1.0 - self.coefficient_floor) * progress)

    def active_in_epoch(self, epoch: float) -> bool:
        """True when DeNS may corrupt structures in (fractional) epoch ``epoch``."""
        if self.epochs is None:
            return True
        start, end = self.epochs
        return start <= epoch < end
