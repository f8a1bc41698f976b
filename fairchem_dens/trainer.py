"""The DeNS trainer: fairchem's EquiformerV2 forces trainer plus the per-structure losses of Alg. 1.

YAML::

    trainer: fairchem_dens.trainer.DeNSTrainer
    dataset:
      train: {format: fairchem_dens.datasets.DeNSLmdbDataset, src: ...}
    optim:
      dens: {prob: 0.5, sigma_high: 0.5, coefficient: 10, corrupt_ratio: 1.0, candidates: free}

Only the narrowest methods are overridden; everything else (optimiser, EMA, checkpoints,
validation, predict, relaxations) is fairchem's. A batch without DeNS fields (validation, test,
predict, relaxation, or ``optim.dens`` absent) takes exactly the parent's code path.

Losses of a mixed batch, in one forward/backward (Alg. 1 l.28-40, App. D.1): with B structures
and N loss atoms (free atoms if ``train_on_free_atoms``, plus corrupted atoms) over all ranks,

* L_E  = Σ_structures |E' − Ê| / B      (both tasks, Eq. 1 and Eq. 6; DeNS structures excluded
  when ``energy_on_dens: false``, Table 1e idx 3)
* any other system-level target (stress, rank-2): original-task structures only, over the same
  B (:func:`system_target_keep`)
* L_F  = Σ_{uncorrupted loss atoms} ℓ(f̂, f') / N          (Eq. 1, Alg. 1 l.31 and l.36)
* L_DeNS = Σ_{corrupted atoms} ℓ(ε̂, ε/σ) / N              (Eq. 4, Alg. 1 l.30)

and the loss is λ_E·L_E + λ_F·L_F + λ_DeNS·L_DeNS. The shared denominators make each structure
weigh as in Alg. 1 l.32/37/40, and every term is a global mean over ranks computed with one
all-reduce per step whatever was drawn, so ranks that draw differently never hang.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from fairchem.core.common import distutils
from fairchem.core.common.registry import registry
from fairchem.core.models.equiformer_v2.trainers.forces_trainer import EquiformerV2ForcesTrainer
from torch_geometric.data import Batch

from fairchem_dens import keys
from fairchem_dens.config import DeNSConfig, DeNSConfigError
from fairchem_dens.datasets import DeNSDatasetMixin, find_dens_dataset
from fairchem_dens.dens_only import dens_only_parameters
from fairchem_dens.inference import InferenceMixin
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


def _loss_per_row(
    fn: torch.nn.Module, pred: torch.Tensor, target: torch.Tensor, natoms: torch.Tensor
) -> torch.Tensor:
    """Elementwise fairchem loss reduced to one value per row (atom or structure): (rows,)."""
    loss = fn(pred, target, natoms)
    return loss.reshape(pred.shape[0], -1).mean(-1)


def check_required_keys(model: Any, outputs: Any, optim: Any, loss_functions: Any) -> None:
    """One line naming the first key fairchem would otherwise fail on with a bare KeyError."""
    required = {
        "model.name": (model or {}).get("name"),
        "outputs": outputs,
        "loss_functions": loss_functions,
        "optim.max_epochs": (optim or {}).get("max_epochs"),
        "optim.lr_initial": (optim or {}).get("lr_initial"),
    }
    if (model or {}).get("name") == "hydra":
        required["model.backbone.model"] = ((model or {}).get("backbone") or {}).get("model")
    params = (optim or {}).get("scheduler_params") or {}
    if params.get("lambda_type") == "cosine":
        for key in ("warmup_epochs", "warmup_factor", "lr_min_factor"):
            required[f"optim.scheduler_params.{key}"] = params.get(key)
    for key, value in required.items():
        if value is None or value == {} or value == []:
            raise DeNSConfigError(f"{key}: required key is missing from the config")


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
            check_train_format(dataset)
            check_energy_targets(outputs, self.dens)
        evaluation_metrics = dict(evaluation_metrics or {})
        evaluation_metrics.setdefault("metrics", DEFAULT_METRICS)
        evaluation_metrics.setdefault("primary_metric", DEFAULT_PRIMARY_METRIC)
        self._model_output: Any = None
        self._dens_log: dict[str, float] = {}
        self._dens_dataset = None
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
        """Parent's model, plus a hook that keeps the raw model output (it holds the noise)."""
        super().load_model()
        self._unwrapped_model.register_forward_hook(self._keep_model_output)
        self._dens_parameters = dens_only_parameters(self._unwrapped_model)

    def _keep_model_output(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        self._model_output = output

    def load_datasets(self) -> None:
        """Parent's datasets; with DeNS on, check the training dataset can corrupt."""
        super().load_datasets()
        if self.dens is None or self.train_loader is None:
            return
        dataset = find_dens_dataset(self.train_dataset)
        self._dens_dataset = dataset
        sampler = self.train_sampler
        set_epoch = sampler.set_epoch_and_start_iteration

        def set_epoch_and_start_iteration(epoch: int, start_iteration: int) -> None:
            set_epoch(epoch, start_iteration)
            dataset.set_dens_epoch(epoch)  # before the DataLoader's workers start

        sampler.set_epoch_and_start_iteration = set_epoch_and_start_iteration

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
        """Parent's scheduler/EMA set-up, after checking the warm-up is at least one step."""
        params = self.config["optim"].get("scheduler_params", {})
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
        """Enable the corruption (normalisers are final now, after any checkpoint load), then
        run fairchem's training loop."""
        self.enable_dens_on_train_data()
        super().train(disable_eval_tqdm=disable_eval_tqdm)

    # ---- losses ----------------------------------------------------------------------------

    def dens_coefficient(self) -> float:
        """λ_DeNS at the current global step (App. D.2 decay, exact after a resume)."""
        total = self.config["optim"]["max_epochs"] * len(self.train_loader)
        return self.dens.coefficient_at(self.step, total)

    def _noise_prediction(self) -> torch.Tensor:
        """ε̂ from the last model output: (n_atoms, 3)."""
        output = self._model_output
        candidates = [output] + [v for v in output.values() if isinstance(v, dict)]
        for mapping in candidates:
            if keys.NOISE_OUTPUT in mapping:
                return mapping[keys.NOISE_OUTPUT]
        raise DeNSConfigError(
            f"model.heads: no head outputs '{keys.NOISE_OUTPUT}'; add e.g. "
            "dens_noise: {module: fairchem_dens.heads.EqV2NoiseHead}"
        )

    def _compute_loss(self, out: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        if keys.DENS_MASK not in batch:
            loss = super()._compute_loss(out, batch)
            if self._dens_parameters and self.model is not self._unwrapped_model:
                # without DeNS fields (DeNS off, or outside `epochs`) the DeNS modules do not
                # run; DDP (no find_unused_parameters) needs a gradient for every parameter
                loss = loss + 0.0 * sum(p.sum() for p in self._dens_parameters)
            return loss

        corrupted = batch[keys.DENS_MASK]  # m_i, (n_atoms,)
        is_dens = batch[keys.DENS_STRUCTURE]  # (n_structures,)
        free = batch.fixed == 0
        force_spec = self.output_targets[self._force_target()]
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

        terms: dict[str, tuple[float, torch.Tensor]] = {}
        for target_name, loss_info in self.loss_functions:
            spec = self.output_targets[target_name]
            pred, target = out[target_name], batch[target_name]
            if spec.get("level") == "atom":
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
            rows = _loss_per_row(loss_info["fn"].loss_fn, pred, target, batch.natoms)
            # Eq. 1 / Eq. 6 terms as global means (× world size: DDP averages gradients)
            value = (rows * keep).sum() * world / denominator
            terms[target_name] = (loss_info["coefficient"], value)

        # Eq. 4 / Alg. 1 l.30: ℓ(ε̂, ε/σ) on corrupted atoms
        dens_fn = self._dens_loss_fn()
        noise = self._noise_prediction().view(-1, 3)
        rows = _loss_per_row(dens_fn, noise, batch[keys.DENS_TARGET], batch.natoms)
        dens_value = (rows * corrupted).sum() * world / num_atoms
        terms["dens"] = (self.dens_coefficient(), dens_value)

        self._log_dens_terms(terms, batch)
        loss = sum(coefficient * value for coefficient, value in terms.values())
        return loss  # Alg. 1 l.32/37/40

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
        is_dens = batch[keys.DENS_STRUCTURE]
        if not is_dens.any():
            metrics = super()._compute_metrics(out, batch, evaluator, metrics)
        elif not is_dens.all():
            original = (~is_dens).nonzero().view(-1)
            atoms = ~is_dens[batch.batch]
            sub_out = {
                name: value[atoms]
                if self.output_targets[name].get("level") == "atom"
                else value[original]
                for name, value in out.items()
            }
            sub_batch = Batch.from_data_list(batch.index_select(original))
            metrics = super()._compute_metrics(sub_out, sub_batch, evaluator, metrics)
        for name, value in self._dens_log.items():
            metrics = evaluator.update(name, value, metrics)
        return metrics
