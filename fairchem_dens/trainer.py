"""The DeNS trainer: fairchem's EquiformerV2 forces trainer plus the per-structure losses of Alg. 1.

YAML::

    trainer: fairchem_dens.trainer.DeNSTrainer
    dataset:
      train: {format: fairchem_dens.datasets.DeNSLmdbDataset, src: ...}
    optim:
      dens: {prob: 0.5, sigma_high: 0.5, coefficient: 10, corrupt_ratio: 1.0, candidates: free}

Only the narrowest methods are overridden; everything else (optimiser, EMA, checkpoints,
validation, predict, relaxations) is fairchem's. A batch without DeNS fields (validation, test,
predict, relaxation, or ``optim.dens`` absent) takes exactly the parent's code path. With
``optim.dens`` absent the trainer also accepts every ``forces`` trainer config of fairchem 1.10
(``optim.scheduler: "Null"`` without ``scheduler_params`` included).

**The noise prediction is a declared model output.** fairchem's ``_forward`` copies from the model
output only the keys declared in ``output_targets``. On a training batch with at least one
corrupted atom the trainer declares one more atom-level target, the noise head's output
(:data:`fairchem_dens.keys.NOISE_OUTPUT`, (n_atoms, 3)), for the duration of that ``_forward``
call only, so it reaches :meth:`DeNSTrainer._compute_loss` in ``out`` like energy and forces, and
fairchem raises if the head did not return it. Validation, predict and relaxations never declare
it. Rows of atoms that are not corrupted are unspecified (a head may skip them); the loss reads
only corrupted rows. A batch with DeNS fields but no corrupted atom does not declare it and gets a
DeNS term of exactly 0.

**Losses of a mixed batch**, in one forward/backward (Alg. 1 l.28-40, App. D.1): with B structures
and N loss atoms (free atoms if ``train_on_free_atoms``, plus corrupted atoms) over all ranks, and
ℓ the elementwise loss of each ``loss_functions`` entry averaged over its components (x, y, z),

* L_E  = Σ_structures ℓ(Ê, E') / B       (both tasks, Eq. 1 and Eq. 6; DeNS structures excluded
  when ``energy_on_dens: false``, Table 1e idx 3)
* any other system-level target (stress, rank-2): original-task structures only, over the same
  B (:func:`system_target_keep`)
* L_F  = Σ_{uncorrupted loss atoms} ℓ(f̂, f') / N          (Eq. 1, Alg. 1 l.31 and l.36);
  with gradient forces (:func:`gradient_forces`) over the loss atoms of original-task structures
  only (see below)
* L_DeNS = Σ_{corrupted atoms} ℓ(ε̂, ε/σ) / N              (Eq. 4, Alg. 1 l.30)

and the loss is λ_E·L_E + λ_F·L_F + λ_DeNS·L_DeNS. The shared denominators B and N (the
*shared-denominator convention*) make each structure weigh as in Alg. 1 l.32/37/40: a structure's
atoms count once in N whichever task they serve. Every term is a global mean over ranks computed
with one all-reduce per step whatever was drawn, so ranks that draw differently never hang. Without
a drawn structure (no corrupted atom) the loss equals fairchem's own ``OCPTrainer._compute_loss``.

**Gradient (energy-conserving) forces** -- eSEN with ``esen_mlp_efs_head`` (``direct_forces:
false``): forces and stress are −∂E/∂r and the virial at the *input* geometry. On a DeNS structure
that geometry is the corrupted one, where the label's forces are not the gradient of anything the
model should learn (the label belongs to the original geometry; Alg. 1 l.31 trains uncorrupted atoms
only because a direct-force model predicts each atom's force from the corrupted neighbourhood as an
input, the gradient does not). So a DeNS structure trains no atom-level target and no stress, only
the noise (Eq. 4) and, unless ``energy_on_dens: false``, the original structure's energy (Eq. 6);
its atoms still count in N. Everything else -- one forward/backward per mixed batch, the shared
denominators, the all-reduce -- is as above.

Each ``loss_functions`` entry's ``reduction`` is honoured as fairchem's ``DDPLoss`` does it:
``mean`` as above, ``sum`` drops the denominators (each rank's sum; DDP averages the gradients);
the DeNS term takes the forces entry's reduction. A non-finite prediction is logged and its NaNs
set to 0, as ``DDPLoss`` does.
"""

from __future__ import annotations

import logging
import math
import weakref
from pathlib import Path
from typing import Any

import torch
from fairchem.core.common import distutils
from fairchem.core.common.registry import registry
from fairchem.core.models.equiformer_v2.trainers.forces_trainer import EquiformerV2ForcesTrainer
from fairchem.core.modules.loss import DDPLoss
from fairchem.core.trainers.base_trainer import BaseTrainer
from torch_geometric.data import Batch

from fairchem_dens import keys
from fairchem_dens.config import DeNSConfig, DeNSConfigError
from fairchem_dens.datasets import DeNSDatasetMixin, find_dens_dataset
from fairchem_dens.dens_only import dens_only_parameters, is_dens_only
from fairchem_dens.inference import InferenceMixin, metadata_file
from fairchem_dens.models.base import DeNSEncodingMixin
from fairchem_dens.noise import INELIGIBLE, Status

#: Evaluation used when the YAML gives none (fairchem's own S2EF metrics).
DEFAULT_METRICS = {
    "energy": ["mae"],
    "forces": [
        "forcesx_mae",
        "forcesy_mae",
        "forcesz_mae",
        "mae",
        "cosine_similarity",
        "magnitude_error",
    ],
    "misc": ["energy_forces_within_threshold"],
}
DEFAULT_PRIMARY_METRIC = "forces_mae"

#: ``reduction`` values of a ``loss_functions`` entry (those of fairchem 1.10's DDPLoss).
REDUCTIONS = ("mean", "sum")

#: Keys each ``lambda_type`` of EquiformerV2's LambdaLR schedule reads.
LAMBDA_KEYS = {
    "cosine": ("warmup_epochs", "warmup_factor", "lr_min_factor"),
    "multistep": ("warmup_epochs", "warmup_factor", "decay_epochs", "decay_rate"),
}

#: Keys of fairchem's default schedule (``warmup_lr_lambda``), used without ``optim.scheduler``.
DEFAULT_SCHEDULE_KEYS = ("warmup_steps", "warmup_factor", "lr_gamma", "lr_milestones")

#: The command that writes the ``metadata.npz`` of an LMDB folder (fairchem 1.10).
METADATA_COMMAND = "python -m fairchem.core.scripts.make_lmdb_sizes --data-path"


def _loss_per_row(
    fn: torch.nn.Module,
    pred: torch.Tensor,
    target: torch.Tensor,
    natoms: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Elementwise fairchem loss reduced to one value per row (atom or structure): (rows,).

    ``mean`` averages a row's components (so the rows' mean is fairchem's mean over elements),
    ``sum`` adds them (so the rows' sum is fairchem's sum over elements).
    """
    loss = fn(pred, target, natoms).reshape(pred.shape[0], -1)
    return loss.sum(-1) if reduction == "sum" else loss.mean(-1)


def check_required_keys(model: Any, outputs: Any, optim: Any, loss_functions: Any) -> None:
    """One line naming the first key fairchem would otherwise fail on with a bare error."""
    optim = optim or {}
    required = {
        "model.name": (model or {}).get("name"),
        "outputs": outputs,
        "loss_functions": loss_functions,
        "optim.max_epochs": optim.get("max_epochs"),
        "optim.lr_initial": optim.get("lr_initial"),
    }
    if (model or {}).get("name") == "hydra":
        required["model.backbone.model"] = ((model or {}).get("backbone") or {}).get("model")
    params = optim.get("scheduler_params") or {}
    if "scheduler" not in optim:  # fairchem's default schedule (warmup_lr_lambda, by steps)
        for key in DEFAULT_SCHEDULE_KEYS:
            required[f"optim.{key}"] = optim.get(key)
    elif optim.get("scheduler") == "LambdaLR":
        lambda_type = params.get("lambda_type")
        required["optim.scheduler_params.lambda_type"] = lambda_type
        if lambda_type is not None and lambda_type not in LAMBDA_KEYS:
            raise DeNSConfigError(
                f"optim.scheduler_params.lambda_type={lambda_type!r}: must be one of "
                f"{list(LAMBDA_KEYS)} (EquiformerV2's LambdaLR schedule)"
            )
        for key in LAMBDA_KEYS.get(lambda_type, ()):
            required[f"optim.scheduler_params.{key}"] = params.get(key)
    for key, value in required.items():
        if value is None or value == {} or value == []:
            raise DeNSConfigError(f"{key}: required key is missing from the config")
    for entry in loss_functions if isinstance(loss_functions, list) else []:
        for target, spec in (entry or {}).items():
            reduction = (spec or {}).get("reduction")
            if reduction is not None and reduction not in REDUCTIONS:
                raise DeNSConfigError(
                    f"loss_functions.{target}.reduction={reduction!r}: must be one of "
                    f"{list(REDUCTIONS)} (fairchem 1.10's DDPLoss)"
                )


def check_dens_epochs(config: DeNSConfig) -> None:
    """Refuse a fractional ``optim.dens.epochs`` bound: the dataset draws per whole epoch."""
    if config.epochs is None:
        return
    for bound in config.epochs:
        if float(bound) != math.floor(bound):
            raise DeNSConfigError(
                f"optim.dens.epochs={list(config.epochs)}: bounds must be whole epochs (the "
                "corruption is drawn per epoch; a fractional bound would silently cover its "
                "whole epoch)"
            )


def check_train_format(dataset: Any) -> None:
    """Raise unless ``dataset.train.format`` names a DeNS dataset class."""
    train = (dataset.get("train") or {}) if isinstance(dataset, dict) else {}
    found = train.get("format", "lmdb")
    if "src" not in train:
        return  # no training data (predict / relaxations): nothing to corrupt
    try:
        dataset_class = registry.get_dataset_class(found)
    except RuntimeError:
        dataset_class = None
    if not (isinstance(dataset_class, type) and issubclass(dataset_class, DeNSDatasetMixin)):
        raise DeNSConfigError(
            f"dataset.train.format={found!r}: optim.dens needs a DeNS dataset, "
            "fairchem_dens.datasets.DeNSLmdbDataset (OC20), DeNSOC22LmdbDataset (OC22) or "
            "DeNSAseDBDataset (ase_db, .aselmdb)"
        )


def check_energy_targets(outputs: dict[str, Any], config: DeNSConfig) -> None:
    """Every name in ``optim.dens.energy_targets`` is a system-level output (or a part of one)."""
    if config.energy_targets is None:
        return
    levels = {name: (spec or {}).get("level", "system") for name, spec in outputs.items()}
    for name, spec in outputs.items():
        for part in (spec or {}).get("decomposition") or {}:
            levels[part] = levels[name]
    for name in config.energy_targets:
        if levels.get(name) != "system":
            raise DeNSConfigError(
                f"optim.dens.energy_targets: {name!r} is not a system-level target of `outputs` "
                f"(system-level: {sorted(k for k, v in levels.items() if v == 'system')})"
            )


def system_target_keep(
    target_name: str, spec: dict[str, Any], is_dens: torch.Tensor, config: DeNSConfig
) -> torch.Tensor:
    """Which structures a system-level target trains on: (n_structures,) bool.

    A DeNS structure's input is the corrupted geometry with the original forces (Eq. 5), and its
    system-level labels belong to the original geometry. The targets named in
    ``optim.dens.energy_targets`` (default: ``energy``; a decomposed target follows its parent's
    name) are the energy of the original structure, which Eq. 6 trains on DeNS structures too,
    unless ``energy_on_dens: false`` (Table 1e idx 3). Every other system-level target -- stress
    and its isotropic/anisotropic parts, any rank-2 or geometry-dependent property -- is not
    recoverable from the corrupted geometry: DeNS structures never train it. (Names, not
    shapes, decide: the isotropic stress is a scalar, as the energy is.)

    Args:
        target_name: the loss target.
        spec: its ``outputs`` entry as fairchem's ``load_task`` leaves it (``parent`` for parts).
        is_dens: (n_structures,) bool, ``keys.DENS_STRUCTURE``.
        config: the DeNS settings.
    """
    energy_like = {target_name, spec.get("parent")} & set(config.dens_energy_targets)
    if energy_like and config.energy_on_dens:
        return torch.ones_like(is_dens)
    return ~is_dens


def gradient_forces(model: Any) -> bool:
    """Whether the model's forces are −∂E/∂r: fairchem's convention, a backbone that regresses
    forces with ``direct_forces`` False (eSEN once ``esen_mlp_efs_head`` is attached). EquiformerV2
    and eSCN have no such switch and give direct forces."""
    backbone = getattr(model, "backbone", model)
    return bool(getattr(backbone, "regress_forces", False)) and (
        getattr(backbone, "direct_forces", True) is False
    )


def check_force_encoding_backbone(model: Any, model_config: dict[str, Any]) -> None:
    """With ``optim.dens``, the backbone must be a force-encoding one (Eq. 5)."""
    if isinstance(getattr(model, "backbone", None), DeNSEncodingMixin):
        return
    name = ((model_config or {}).get("backbone") or {}).get("model") or (model_config or {}).get(
        "name"
    )
    raise DeNSConfigError(
        f"model.backbone.model={name!r}: optim.dens needs a force-encoding backbone "
        "(fairchem_dens.models.equiformer_v2.DeNSEquiformerV2Backbone, "
        "fairchem_dens.models.escn.DeNSeSCNBackbone or fairchem_dens.models.esen.DeNSeSENBackbone; "
        "use_force_encoding: false for the ablation without it)"
    )


def check_stress_cell(model: Any, outputs: dict[str, Any], dataset: Any, src: Any) -> None:
    """Stress needs a cell: one line naming the key that asks for stress when the first training
    structure has no cell of non-zero volume."""
    backbone = getattr(model, "backbone", model)
    if bool(getattr(backbone, "regress_stress", False)):
        key = "model.backbone.regress_stress"
    else:
        names = [name for name in outputs if "stress" in name]
        if not names:
            return
        key = f"outputs.{names[0]}"
    if dataset is None or len(dataset) == 0:
        return
    cell = getattr(dataset[0], "cell", None)
    volume = 0.0 if cell is None else abs(float(torch.linalg.det(cell.reshape(-1, 3, 3)[0])))
    if volume < 1e-8:
        found = "no cell" if cell is None else "a cell of zero volume"
        raise DeNSConfigError(
            f"{key}: stress needs a periodic cell, but the training data ({src}) has {found}"
        )


def follow_epochs(sampler: Any, dataset: DeNSDatasetMixin) -> None:
    """Make ``sampler.set_epoch_and_start_iteration`` also set the dataset's DeNS epoch.

    The wrapper holds the sampler by weak reference, so no reference cycle keeps the sampler
    (and through it the dataset and its open files) alive after the trainer is gone.
    """
    method = type(sampler).set_epoch_and_start_iteration
    sampler_ref = weakref.ref(sampler)

    def set_epoch_and_start_iteration(epoch: int, start_iteration: int) -> None:
        method(sampler_ref(), epoch, start_iteration)
        dataset.set_dens_epoch(epoch)  # before the DataLoader's workers start

    sampler.set_epoch_and_start_iteration = set_epoch_and_start_iteration


@registry.register_trainer("dens_forces")
class DeNSTrainer(InferenceMixin, EquiformerV2ForcesTrainer):
    """fairchem's EquiformerV2 forces trainer (the OCP trainer with an epoch-based cosine
    schedule, as the paper trains) with DeNS as an auxiliary task (§3.2.3, Alg. 1).

    DeNS settings are read from ``optim.dens`` (see :class:`fairchem_dens.config.DeNSConfig`).
    """

    def __init__(
        self,
        task: dict[str, Any],
        model: dict[str, Any],
        outputs: dict[str, Any],
        dataset: dict[str, Any],
        optimizer: dict[str, Any],
        loss_functions: dict[str, Any],
        evaluation_metrics: dict[str, Any],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        check_required_keys(model, outputs, optimizer, loss_functions)
        self.dens: DeNSConfig | None = DeNSConfig.from_optim(optimizer)
        if self.dens is not None:
            check_dens_epochs(self.dens)
            check_train_format(dataset)
            check_energy_targets(outputs, self.dens)
        evaluation_metrics = dict(evaluation_metrics or {})
        evaluation_metrics.setdefault("metrics", DEFAULT_METRICS)
        evaluation_metrics.setdefault("primary_metric", DEFAULT_PRIMARY_METRIC)
        self._dens_log: dict[str, float] = {}
        self._dens_dataset = None
        #: (key, spec) of the noise output declared on DeNS batches; None with DeNS off
        self._noise_target: tuple[str, dict[str, Any]] | None = None
        super().__init__(
            task,
            model,
            outputs,
            dataset,
            optimizer,
            loss_functions,
            evaluation_metrics,
            *args,
            **kwargs,
        )

    # ---- set-up ----------------------------------------------------------------------------

    def load_model(self) -> None:
        """Parent's model; with DeNS on, find the noise head whose output the loss reads."""
        super().load_model()
        model = self._unwrapped_model
        self._dens_parameters = dens_only_parameters(model)
        #: forces are −∂E/∂r (eSEN, direct_forces false): DeNS structures train no forces/stress
        self.gradient_forces = gradient_forces(model)
        if self.dens is not None:
            train = getattr(self, "train_dataset", None)
            src = ((self.config.get("dataset") or {}).get("train") or {}).get("src")
            check_stress_cell(model, self.config.get("outputs") or {}, train, src)
            self._noise_target = self._find_noise_target()

    def _find_noise_target(self) -> tuple[str, dict[str, Any]] | None:
        """The model-output key of the noise head and its output-target spec (atom level);
        None without one (a plain model can still validate and predict)."""
        model = self._unwrapped_model
        heads = getattr(model, "output_heads", None) or {}
        found = [(name, head) for name, head in heads.items() if is_dens_only(head)]
        if len(found) > 1:
            raise DeNSConfigError(
                f"model.heads: {len(found)} DeNS noise heads "
                f"({', '.join(name for name, _ in found)}); optim.dens needs exactly one"
            )
        if not found:
            return None
        name, head = found[0]
        output = getattr(head, "output_name", keys.NOISE_OUTPUT)
        # HydraModel returns head outputs by their name with pass_through_head_outputs, else
        # nested under the head's name (fairchem's _forward then reads `property`)
        key = output if getattr(model, "pass_through_head_outputs", False) else name
        return key, {"level": "atom", "property": output}

    def load_datasets(self) -> None:
        """Parent's datasets; with DeNS on, check the training dataset can corrupt."""
        super().load_datasets()
        if self.dens is None or self.train_loader is None:
            return
        self._dens_dataset = find_dens_dataset(self.train_dataset)
        follow_epochs(self.train_sampler, self._dens_dataset)

    def get_sampler(self, dataset: Any, batch_size: int, shuffle: bool) -> Any:
        """Parent's sampler, after checking that ``load_balancing: atoms`` finds the sizes."""
        optim = self.config["optim"]
        mode = optim.get("load_balancing")
        on_error = optim.get("load_balancing_on_error") or "raise"
        if mode is not None and on_error == "raise":  # fairchem then raises without sizes
            if not dataset.metadata_hasattr("natoms"):
                found = metadata_file(dataset)
                path, data = found or (Path("<data folder>/metadata.npz"), Path("<data folder>"))
                raise DeNSConfigError(
                    f"optim.load_balancing={mode!r}: needs {path} (atoms per entry), which is "
                    f"missing; write it with `{METADATA_COMMAND} {data}` (or set "
                    "optim.load_balancing_on_error: warn_and_no_balance)"
                )
        return super().get_sampler(dataset, batch_size, shuffle)

    def load_checkpoint(
        self, checkpoint_path: str, checkpoint: dict | None = None, inference_only: bool = False
    ) -> None:
        """Parent's (and the inference mixin's) load, then resume the very run: fairchem saves
        ``checkpoint.pt`` before ``scheduler.step()`` (and a preemption can land between the
        step counter and ``optimizer.step()``), so re-align the step with the updates the
        optimizer applied and let the scheduler catch up."""
        super().load_checkpoint(checkpoint_path, checkpoint, inference_only)
        if inference_only or getattr(self, "scheduler", None) is None:
            return
        applied = [int(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        if applied and self.scaler is None and max(applied) < self.step:
            self.step = max(applied)  # redo the step that never reached optimizer.step()
        if self.scheduler.scheduler_type not in ("Null", "ReduceLROnPlateau"):
            while self.scheduler.scheduler.last_epoch < self.step:
                self.scheduler.step()

    def load_extras(self) -> None:
        """Parent's scheduler/EMA set-up, after checking the warm-up is at least one step.

        As with fairchem's ``forces`` trainer, ``optim.scheduler: "Null"`` needs no
        ``scheduler_params`` (EquiformerV2's scheduler reads them unconditionally, so they default
        to {}), and without ``optim.scheduler`` fairchem's default schedule (``warmup_lr_lambda``)
        is used.
        """
        optim = self.config["optim"]
        if "scheduler" not in optim:
            # fairchem's `forces` trainer default (EquiformerV2's scheduler has none)
            BaseTrainer.load_extras(self)
            return
        if optim.get("scheduler") == "Null" and optim.get("scheduler_params") is None:
            optim["scheduler_params"] = {}
        params = optim.get("scheduler_params") or {}
        warmup = params.get("warmup_epochs")
        if self.train_loader is not None and isinstance(warmup, (int, float)):
            steps = int(warmup * len(self.train_loader))
            if steps < 1:
                raise DeNSConfigError(
                    f"optim.scheduler_params.warmup_epochs={warmup!r}: rounds to 0 warm-up steps "
                    f"with {len(self.train_loader)} steps per epoch (fairchem's cosine schedule "
                    "would divide by zero); raise it to at least one step"
                )
        super().load_extras()

    def _force_target(self) -> str:
        """Name of the per-atom force target (the one whose forces are encoded)."""
        atom_targets = [
            name
            for name, _ in self.loss_functions
            if self.output_targets[name].get("level") == "atom"
        ]
        return atom_targets[0] if len(atom_targets) == 1 else "forces"

    def enable_dens_on_train_data(self) -> None:
        """Turn the corruption on for the training dataset, with the current forces normaliser
        (σ_F of Alg. 1 l.24) and seed."""
        if self._dens_dataset is None:
            return
        normalizer = self.normalizers.get(self._force_target())
        mean = float(normalizer.mean) if normalizer is not None else 0.0
        std = float(normalizer.rmsd) if normalizer is not None else 1.0
        seed = self.dens.seed if self.dens.seed is not None else self.config["cmd"]["seed"]
        self._dens_dataset.enable_dens(self.dens, seed or 0, mean, std)
        logging.info(f"DeNS on: {self.dens}; encoded forces = (f - {mean:g}) / {std:g}")

    def train(self, disable_eval_tqdm: bool = False) -> None:
        """Check the model can train DeNS (force-encoding backbone, noise head), enable the
        corruption (normalisers are final now, after any checkpoint load), then run fairchem's
        training loop."""
        if self._dens_dataset is not None:  # a plain model may still validate and predict
            check_force_encoding_backbone(self._unwrapped_model, self.config["model"])
        if self._dens_dataset is not None and self._noise_target is None:
            raise DeNSConfigError(
                "model.heads: optim.dens needs a DeNS noise head, found none; add e.g. "
                f"{keys.NOISE_OUTPUT}: {{module: fairchem_dens.heads.EqV2NoiseHead}}"
            )
        self.enable_dens_on_train_data()
        super().train(disable_eval_tqdm=disable_eval_tqdm)

    # ---- forward: the noise prediction as a declared output -------------------------------

    def _forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """Parent's forward; on a batch with corrupted atoms the noise head's output is a
        declared output target for this call, so ``out`` carries it (fairchem raises if the
        model did not return it)."""
        if self._noise_target is None or keys.DENS_MASK not in batch:
            return super()._forward(batch)
        if not bool(batch[keys.DENS_MASK].any()):  # nothing to denoise: the head may skip
            return super()._forward(batch)
        name, spec = self._noise_target
        self.output_targets[name] = spec
        try:
            return super()._forward(batch)
        finally:
            del self.output_targets[name]

    # ---- losses ----------------------------------------------------------------------------

    def dens_coefficient(self) -> float:
        """λ_DeNS at the current global step (App. D.2 decay, exact after a resume)."""
        total = self.config["optim"]["max_epochs"] * len(self.train_loader)
        return self.dens.coefficient_at(self.step, total)

    def _ddp_guard(self, loss: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``loss + 0·Σp`` over the DeNS-only parameters when DDP wraps the model and the DeNS
        modules may have had no part in this step's graph (no DeNS fields, or no noise
        output): DDP without ``find_unused_parameters`` needs a gradient for every parameter."""
        if not self._dens_parameters or self.model is self._unwrapped_model:
            return loss
        if noise is not None and noise.requires_grad:
            return loss
        return loss + 0.0 * sum(p.sum() for p in self._dens_parameters)

    def _compute_loss(self, out: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        if keys.DENS_MASK not in batch:
            return self._ddp_guard(super()._compute_loss(out, batch))

        corrupted = batch[keys.DENS_MASK]  # m_i, (n_atoms,)
        is_dens = batch[keys.DENS_STRUCTURE]  # (n_structures,)
        free = batch.fixed == 0
        force_name = self._force_target()
        force_spec = self.output_targets[force_name]
        loss_atoms = free if force_spec.get("train_on_free_atoms", True) else torch.ones_like(free)
        # one collective per step, whatever was drawn: global structure and loss-atom counts
        counts = torch.stack(
            [
                torch.tensor(float(batch.natoms.numel()), device=self.device),
                (loss_atoms | corrupted).sum().to(self.device, torch.float),
            ]
        )
        counts = distutils.all_reduce(counts, device=self.device)
        world = distutils.get_world_size()
        num_structures, num_atoms = counts.clamp(min=1.0).unbind()

        noise = out.get(self._noise_target[0]) if self._noise_target is not None else None
        predictions = {name: out[name] for name, _ in self.loss_functions}
        if noise is not None:  # rows of uncorrupted atoms are unspecified: never read them
            predictions["dens"] = torch.where(corrupted.unsqueeze(-1), noise.view(-1, 3), 0.0)
        predictions = self._finite(predictions)

        reductions = {name: self._reduction(name, info) for name, info in self.loss_functions}
        terms: dict[str, tuple[float, torch.Tensor]] = {}
        for target_name, loss_info in self.loss_functions:
            spec = self.output_targets[target_name]
            pred, target = predictions[target_name], batch[target_name]
            if spec.get("level") == "atom":
                if self.gradient_forces:  # −∂E/∂r at a corrupted geometry: not the label's
                    keep = ~is_dens[batch.batch]
                else:
                    keep = ~corrupted  # Alg. 1 l.31: forces of uncorrupted atoms only
                if spec.get("train_on_free_atoms", True):
                    keep = keep & free
                denominator = num_atoms
            else:
                keep = system_target_keep(target_name, spec, is_dens, self.dens)
                denominator = num_structures
            target = target.view(pred.shape[0], -1)
            pred = pred.view(pred.shape[0], -1)
            if target_name in self.elementrefs:
                target = self.elementrefs[target_name].dereference(target, batch)
            if target_name in self.normalizers:
                target = self.normalizers[target_name].norm(target)
            reduction = reductions[target_name]
            rows = _loss_per_row(loss_info["fn"].loss_fn, pred, target, batch.natoms, reduction)
            terms[target_name] = (
                loss_info["coefficient"],
                self._reduce(rows, keep, reduction, world, denominator),  # Eq. 1 / Eq. 6
            )

        # Eq. 4 / Alg. 1 l.30: ℓ(ε̂, ε/σ) on corrupted atoms; exactly 0 when nothing was drawn
        if noise is None:
            dens_value = counts.new_zeros(())
        else:
            reduction = reductions.get(force_name, "mean")
            rows = _loss_per_row(
                self._dens_loss_fn(),
                predictions["dens"],
                batch[keys.DENS_TARGET],
                batch.natoms,
                reduction,
            )
            dens_value = self._reduce(rows, corrupted, reduction, world, num_atoms)
        terms["dens"] = (self.dens_coefficient(), dens_value)

        self._log_dens_terms(terms, batch)
        loss = sum(coefficient * value for coefficient, value in terms.values())
        return self._ddp_guard(loss, noise)  # Alg. 1 l.32/37/40

    @staticmethod
    def _reduce(
        rows: torch.Tensor, keep: torch.Tensor, reduction: str, world: int, denominator: Any
    ) -> torch.Tensor:
        """Σ over kept rows; ``mean``: a global mean over ranks (× world size: DDP averages
        gradients), as fairchem's DDPLoss."""
        total = (rows * keep).sum()
        return total if reduction == "sum" else total * world / denominator

    @staticmethod
    def _reduction(name: str, loss_info: dict[str, Any]) -> str:
        """The ``reduction`` of a ``loss_functions`` entry, as fairchem's DDPLoss holds it."""
        fn = loss_info["fn"]
        reduction = getattr(fn, "reduction", None)
        if not isinstance(fn, DDPLoss) or reduction not in REDUCTIONS:
            raise DeNSConfigError(
                f"loss_functions.{name}: the DeNS loss honours fairchem's DDPLoss with "
                f"reduction {list(REDUCTIONS)}, got {type(fn).__name__} ({reduction!r})"
            )
        return reduction

    @staticmethod
    def _finite(predictions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """fairchem's DDPLoss guard for every prediction at once (one host transfer): a
        non-finite prediction is logged and its NaNs are set to 0."""
        finite = torch.stack([p.isfinite().all() for p in predictions.values()]).tolist()
        if all(finite):
            return predictions
        bad = [name for name, ok in zip(predictions, finite, strict=True) if not ok]
        logging.warning(f"Found nans while computing loss (predictions: {', '.join(bad)})")
        return {
            name: p if ok else torch.nan_to_num(p, nan=0.0)
            for (name, p), ok in zip(predictions.items(), finite, strict=True)
        }

    def _dens_loss_fn(self) -> torch.nn.Module:
        """Elementwise loss of the DeNS term: ``optim.dens.loss`` or the forces' loss."""
        if not hasattr(self, "_dens_loss"):
            if self.dens.loss is None:
                force = dict(self.loss_functions)[self._force_target()]
                self._dens_loss = force["fn"].loss_fn
            else:
                self._dens_loss = registry.get_loss_class(self.dens.loss)()
        return self._dens_loss

    # ---- logging ---------------------------------------------------------------------------

    def _log_dens_terms(self, terms: dict[str, tuple[float, torch.Tensor]], batch: Any) -> None:
        """Keep this step's loss terms (weighted and unweighted) and DeNS fractions.

        All values are gathered in one tensor and read with a single host transfer.
        """
        status = batch[keys.DENS_STATUS]
        names, values = [], []
        for name, (coefficient, value) in terms.items():
            names += [f"loss_{name}", f"loss_{name}_weighted"]
            values += [value.detach(), coefficient * value.detach()]
        fractions = {
            "dens_structure_fraction": batch[keys.DENS_STRUCTURE],
            "dens_atom_fraction": batch[keys.DENS_MASK],
            "dens_eligible_fraction": ~torch.isin(
                status, torch.tensor(INELIGIBLE, device=status.device)
            ),
            "dens_drawn_fraction": (status == Status.DENS)
            | (status == Status.NO_ATOM)
            | (status == Status.MAX_RATIO),
        }
        fractions.update({f"dens_{code.name.lower()}_fraction": status == code for code in Status})
        names += list(fractions)
        values += [mask.float().mean() for mask in fractions.values()]
        log = dict(zip(names, torch.stack(values).tolist(), strict=True))
        log["dens_coefficient"] = float(terms["dens"][0])
        self._dens_log = log

    def _compute_metrics(
        self, out: dict[str, torch.Tensor], batch: Any, evaluator: Any, metrics: dict | None = None
    ) -> dict:
        """Parent's training metrics on the batch's original-task structures (a DeNS structure's
        force prediction on corrupted atoms is not trained), plus the DeNS loss terms."""
        if keys.DENS_MASK not in batch:
            return super()._compute_metrics(out, batch, evaluator, metrics)
        metrics = {} if metrics is None else metrics
        out = {name: value for name, value in out.items() if name in self.output_targets}
        is_dens = batch[keys.DENS_STRUCTURE]
        if not is_dens.all():
            sub_out, sub_batch = self._original_task_part(out, batch, ~is_dens)
            metrics = super()._compute_metrics(sub_out, sub_batch, evaluator, metrics)
        for name, value in self._dens_log.items():
            metrics = evaluator.update(name, value, metrics)
        return metrics

    def _original_task_part(
        self, out: dict[str, torch.Tensor], batch: Any, structures: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], Batch]:
        """The outputs and the batch restricted to the structures selected by the (n_structures,)
        mask ``structures``: every tensor the collation concatenated along dim 0 keeps the rows
        of the selected structures (the collation's slices give each structure's rows: atoms,
        one row, the 3 rows of a 3x3 stress, ...); ``batch``/``ptr`` are renumbered."""
        atoms = structures[batch.batch]  # (n_atoms,)
        sub_out = {
            name: value[atoms]
            if self.output_targets[name].get("level") == "atom"
            else value[structures]
            for name, value in out.items()
        }
        slices = getattr(batch, "_slice_dict", None) or {}
        increments = getattr(batch, "_inc_dict", None) or {}
        keep = structures.cpu()
        fields: dict[str, Any] = {}
        for key in batch.keys():
            value = batch[key]
            if key in ("batch", "ptr") or key not in slices or not isinstance(value, torch.Tensor):
                continue
            increment = increments.get(key)
            if isinstance(increment, torch.Tensor) and bool(increment.any()):
                continue  # indices into other rows (edges): not needed by the metrics
            if value.dim() == 0 or value.shape[0] != int(slices[key][-1]):
                continue  # not concatenated along dim 0
            rows = keep.repeat_interleave(slices[key].diff())  # each structure's rows
            fields[key] = value[rows.to(value.device)]
        natoms = fields["natoms"]
        renumber = structures.long().cumsum(0) - 1  # old structure index -> new one
        fields["batch"] = renumber[batch.batch][atoms]
        fields["ptr"] = torch.cat([natoms.new_zeros(1), natoms.cumsum(0)])
        return sub_out, Batch(**fields)
