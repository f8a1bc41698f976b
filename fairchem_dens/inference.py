"""Inference with DeNS checkpoints: EvalAI-ready predictions and relaxations, checkpoint loading
between plain and DeNS models, and one-line errors for checkpoints and test files that do not fit.

:class:`InferenceMixin` is mixed into :class:`fairchem_dens.trainer.DeNSTrainer` in front of
fairchem's trainer. It overrides three methods narrowly and calls ``super()`` for the work:

``predict``
    fairchem's S2EF writer (``results/<timestamp_id>/ocp_predictions.npz`` under ``--mode
    predict``), unchanged. Added: the test file is checked for ``sid``/``fid`` (one line naming the
    file), OC22-style data default to float32 predictions (fairchem does so only for the legacy
    ``task.dataset: oc22_lmdb``; float16 rounds total energies of hundreds of eV to steps of
    0.125-0.5 eV), and the model's parameters are left as they were on entry. fairchem 1.10's
    ``predict`` swaps in the EMA weights (``ema.store(); ema.copy_to()``) and, on the
    ``per_image=False`` path that relaxations take, returns without swapping back; inside
    ``run_relaxations`` the nested ``store`` also overwrites the saved training weights, so
    training would go on from the EMA weights after ``task.eval_relaxations``.

``run_relaxations``
    fairchem's batched LBFGS relaxations, unchanged (trajectories with ``relax_opt.traj_dir``,
    ``relaxed_positions.npz`` with ``task.write_pos``). Added: ``task.relax_opt`` is checked against
    the LBFGS of fairchem 1.10 (it takes no ``name``), and the relaxed energies are written to
    ``results/<timestamp_id>/relaxed_energies.npz`` (``ids``: system ids as strings, ``energy``:
    eV, float64, sorted as fairchem sorts its result files), the per-split input of fairchem's
    ``make_submission_file.py --is2re-relaxations --hybrid``. fairchem 1.10 itself writes no
    relaxed-energy file.

``load_checkpoint``
    fairchem's loader, after fitting the checkpoint to the model: a plain EquiformerV2/eSCN
    checkpoint loads into the DeNS model (the DeNS-only modules keep their fresh initialisation)
    and a DeNS checkpoint loads into the plain parent model (the DeNS-only tensors are dropped);
    either is reported by module name in one log line, and the position-ordered EMA weights are
    re-ordered to the model's parameters. Any other mismatch (another architecture, other tensor
    shapes) stops with one line naming the file.

Inference always takes the plain S2EF path: test and relaxation datasets are never corrupted, carry
no DeNS fields, and the force encoding and noise head do not run, so results do not depend on
whether the file carries ``y``/``force`` labels.
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fairchem.core.common import distutils
from fairchem.core.common.registry import registry
from fairchem.core.common.relaxation.optimizers.lbfgs_torch import LBFGS
from fairchem.core.common.utils import match_state_dict, pyg2_data_transform
from fairchem.core.datasets.oc22_lmdb_dataset import OC22LmdbDataset
from fairchem.core.modules.scaling.scale_factor import ScaleFactor
from torch_geometric.data import Batch

from fairchem_dens import keys
from fairchem_dens.datasets import find_dens_dataset
from fairchem_dens.dens_only import DeNSOnly, is_dens_only
from fairchem_dens.force_encoding import ForceEncoding, SigmaEncoding

#: File (in ``cmd.results_dir``) with the relaxed energies of ``--mode run-relaxations``.
RELAXED_ENERGIES_FILE = "relaxed_energies.npz"

#: Backbone attributes of the DeNS encodings (``fairchem_dens.models.base``) and how to rebuild one
#: from a backbone, to learn its parameter names when a DeNS checkpoint loads into a plain model.
DENS_BACKBONE_ATTRIBUTES = {
    "force_encoding": lambda backbone: ForceEncoding(
        backbone.lmax_list[0], backbone.sphere_channels
    ),
    "sigma_encoding": lambda backbone: SigmaEncoding(backbone.sphere_channels),
}

#: ``task.relax_opt`` keys fairchem 1.10 passes to ``LBFGS(...)`` (ml_relax sets the others).
RELAX_OPT_KEYS = tuple(
    name
    for name in inspect.signature(LBFGS.__init__).parameters
    if name not in ("self", "optimizable_batch", "save_full_traj", "traj_names")
)


class InferenceError(ValueError):
    """A checkpoint, data file or inference setting does not fit; one line naming it."""


# ---- data files ------------------------------------------------------------------------------


def _lmdb_dataset(dataset: Any) -> Any:
    """The fairchem dataset under ``Subset``-style wrappers (the object with ``.path``)."""
    while dataset is not None and not hasattr(dataset, "path"):
        dataset = getattr(dataset, "dataset", None)
    return dataset


def _first_file(dataset: Any) -> Path:
    path = Path(dataset.path)
    if path.is_file():
        return path
    found = sorted(path.glob("*.lmdb"))
    return found[0] if found else path


def _first_entry(dataset: Any) -> Any:
    """Entry 0 as stored in the file (before fairchem's per-dataset processing, which already
    needs ``sid`` for OC22)."""
    envs = getattr(dataset, "envs", None)
    env = envs[0] if envs else getattr(dataset, "env", None)
    keys_ = getattr(dataset, "_keys", None)
    if env is None or not keys_:
        return dataset[0]
    first_key = keys_[0][0] if isinstance(keys_[0], list) else keys_[0]
    raw = env.begin().get(f"{first_key}".encode("ascii"))
    return pyg2_data_transform(pickle.loads(raw))


def check_ids(dataset: Any, fields: tuple[str, ...], purpose: str) -> None:
    """Raise :class:`InferenceError` unless the first entry of ``dataset`` carries ``fields``.

    Args:
        dataset: a fairchem LMDB dataset, possibly wrapped.
        fields: required id fields, e.g. ``("sid", "fid")``.
        purpose: what the ids are for, quoted in the error.
    """
    base = _lmdb_dataset(dataset)
    if base is None or len(base) == 0:
        return
    entry = _first_entry(base)
    for field in fields:
        if getattr(entry, field, None) is None:
            raise InferenceError(
                f"{_first_file(base)}: entry 0 has no '{field}' field; {purpose} "
                f"needs {' and '.join(repr(f) for f in fields)} on every entry"
            )


S2EF_IDS = ("sid", "fid")
S2EF_PURPOSE = "S2EF predictions are named '<sid>_<fid>' as EvalAI expects; it"
IS2RE_IDS = ("sid",)
IS2RE_PURPOSE = "a relaxation is named by its system id; it"


def check_relax_options(task: dict[str, Any]) -> None:
    """Raise :class:`InferenceError` unless ``task.relax_opt`` is what fairchem 1.10 accepts."""
    relax_opt = task.get("relax_opt")
    example = "{maxstep: 0.04, memory: 50, damping: 1.0, alpha: 70.0}"
    if not isinstance(relax_opt, dict):
        raise InferenceError(
            f"task.relax_opt={relax_opt!r}: fairchem 1.10 relaxations need a mapping of LBFGS "
            f"options ({', '.join(RELAX_OPT_KEYS)}), e.g. {example}"
        )
    for key, value in relax_opt.items():
        if key not in RELAX_OPT_KEYS:
            hint = " (its only optimizer; remove the key)" if key == "name" else ""
            raise InferenceError(
                f"task.relax_opt.{key}={value!r}: fairchem 1.10 passes relax_opt to its LBFGS"
                f"{hint}, which takes only {', '.join(RELAX_OPT_KEYS)}"
            )


# ---- checkpoints -----------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike, map_location: torch.device) -> dict[str, Any]:
    """``torch.load`` a fairchem checkpoint; :class:`InferenceError` if it is not one."""
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # unpickling errors have many types
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise InferenceError(
            f"{path}: cannot be read as a PyTorch checkpoint ({type(error).__name__}: {detail})"
        ) from error
    for entry in ("state_dict", "normalizers"):
        if not isinstance(checkpoint, dict) or entry not in checkpoint:
            raise InferenceError(f"{path}: not a fairchem checkpoint (no '{entry}' entry)")
    if not checkpoint["state_dict"]:
        raise InferenceError(f"{path}: not a fairchem checkpoint (empty 'state_dict')")
    return checkpoint


def _checkpoint_model_name(checkpoint: dict[str, Any]) -> str:
    model = (checkpoint.get("config") or {}).get("model") or {}
    backbone = model.get("backbone") or {}
    return str(backbone.get("model") or model.get("name") or "unknown")


def _checkpoint_dens_heads(checkpoint: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Head name -> head config of the checkpoint's DeNS noise heads (from its saved config)."""
    heads = ((checkpoint.get("config") or {}).get("model") or {}).get("heads") or {}
    found = {}
    for name, head in heads.items():
        try:
            cls = registry.get_model_class(head.get("module", ""))
        except Exception:  # a head class this environment cannot import is no DeNS head
            continue
        if isinstance(cls, type) and issubclass(cls, DeNSOnly):
            found[name] = head
    return found


def _group(names: Iterable[str], prefixes: Iterable[str], wrap: str) -> str:
    """``"backbone.force_encoding.* (1 tensors), ..."`` for the keys under each prefix."""
    names = list(names)
    parts = []
    for prefix in prefixes:
        count = sum(name.startswith(prefix) for name in names)
        if count:
            parts.append(f"{prefix.removeprefix(wrap)}* ({count} tensors)")
    return ", ".join(parts)


def _examples(names: list[str], wrap: str, limit: int = 3) -> str:
    shown = ", ".join(repr(name.removeprefix(wrap)) for name in names[:limit])
    return shown + (", ..." if len(names) > limit else "")


# ---- the mixin -------------------------------------------------------------------------------


class InferenceMixin:
    """EvalAI-ready ``predict``/``run_relaxations`` and plain<->DeNS ``load_checkpoint`` for an
    OCP-style fairchem trainer (mix in before the fairchem trainer class)."""

    _relaxed_energies: dict[str, float] | None = None

    # ---- predict ---------------------------------------------------------------------------

    def load_datasets(self) -> None:
        """Parent's datasets; then check test/relaxation files and relax options up front, so a
        bad file stops the run at start rather than after training."""
        super().load_datasets()
        if self.test_dataset is not None:
            check_ids(self.test_dataset, S2EF_IDS, S2EF_PURPOSE)
        if getattr(self, "relax_dataset", None) is not None:
            check_ids(self.relax_dataset, IS2RE_IDS, IS2RE_PURPOSE)
            check_relax_options(self.config["task"])

    def _check_plain_data(
        self, data_loader: Any, ids: tuple[str, ...] = S2EF_IDS, purpose: str = S2EF_PURPOSE
    ) -> None:
        """Inference data must be uncorrupted (the plain S2EF path) and carry ``ids``; OC22-style
        data give float32 output."""
        if isinstance(data_loader, Batch):
            if keys.DENS_FORCE_INPUT in data_loader:
                raise InferenceError(
                    "predict: the batch carries DeNS fields (a corrupted training batch); "
                    "predictions and relaxations take uncorrupted structures"
                )
            return
        dataset = getattr(data_loader, "dataset", None)
        dens = find_dens_dataset(dataset)
        if dens is not None and dens.dens_enabled:
            raise InferenceError(
                f"{_first_file(_lmdb_dataset(dens))}: predict on a dataset with the DeNS "
                "corruption enabled (the training split); use dataset.test"
            )
        check_ids(dataset, ids, purpose)
        task = self.config["task"]
        if isinstance(_lmdb_dataset(dataset), OC22LmdbDataset) and "prediction_dtype" not in task:
            task["prediction_dtype"] = "float32"
            logging.info(
                "OC22-style test data: predictions are written as float32 "
                "(set task.prediction_dtype to change it)"
            )

    @torch.no_grad()
    def predict(
        self,
        data_loader: Any,
        per_image: bool = True,
        results_file: str | None = None,
        disable_tqdm: bool = False,
    ) -> dict[str, Any]:
        """fairchem's ``predict`` (with ``results_file``: ``<results_dir>/ocp_<results_file>.npz``
        with ``ids`` ``"<sid>_<fid>"``, ``energy`` (n_structures, 1) eV, ``forces``
        (n_free_atoms, 3) eV/Å, ``chunk_idx``), leaving the model's parameters as they were on
        entry."""
        self._check_plain_data(data_loader)
        ema = self.ema
        outer = ema.collected_params if ema is not None else None
        try:
            predictions = super().predict(
                data_loader,
                per_image=per_image,
                results_file=results_file,
                disable_tqdm=disable_tqdm,
            )
        finally:
            if ema is not None and ema.collected_params is not outer:
                # fairchem stored the entry parameters and copied in the EMA weights; its
                # per_image=False path (relaxations) never restores them
                ema.restore()
                ema.collected_params = outer
        if self._relaxed_energies is not None and not per_image:
            sids = data_loader.sid
            sids = sids.tolist() if isinstance(sids, torch.Tensor) else list(sids)
            energies = predictions["energy"].view(-1).tolist()
            # the last prediction of a relaxation is at its final positions
            self._relaxed_energies.update(zip(map(str, sids), energies, strict=True))
        return predictions

    # ---- relaxations -----------------------------------------------------------------------

    def run_relaxations(self) -> None:
        """fairchem's relaxations, then ``<results_dir>/relaxed_energies.npz`` (``ids``,
        ``energy`` in eV: total energies for OC22-style data, as the model predicts them)."""
        check_relax_options(self.config["task"])
        self._check_plain_data(self.relax_loader, IS2RE_IDS, IS2RE_PURPOSE)
        ema = self.ema
        outer = ema.collected_params if ema is not None else None
        self._relaxed_energies = {}
        try:
            super().run_relaxations()
            energies = self._relaxed_energies
        finally:
            self._relaxed_energies = None
            if ema is not None and ema.collected_params is not outer:
                ema.restore()  # no-op after a normal end; the training weights after an error
                ema.collected_params = outer
        self.write_relaxed_energies(energies)

    def write_relaxed_energies(self, energies: dict[str, float]) -> str | None:
        """Gather ``sid -> energy`` (eV) over ranks and write :data:`RELAXED_ENERGIES_FILE`.

        Returns:
            The written path on the master rank, else None.
        """
        gathered = distutils.gather_objects(sorted(energies.items()))
        distutils.synchronize()
        if not distutils.is_master():
            return None
        merged = dict(item for part in gathered for item in part)
        ids = np.array(list(merged), dtype=str)
        values = np.array(list(merged.values()), dtype=np.float64)
        _, index = np.unique(ids, return_index=True)  # fairchem's result-file order
        path = os.path.join(self.config["cmd"]["results_dir"], RELAXED_ENERGIES_FILE)
        logging.info(f"Writing relaxed energies ({len(index)} systems) to {path}")
        np.savez_compressed(path, ids=ids[index], energy=values[index])
        return path

    # ---- checkpoints -----------------------------------------------------------------------

    def load_checkpoint(
        self,
        checkpoint_path: str,
        checkpoint: dict | None = None,
        inference_only: bool = False,
    ) -> None:
        """fairchem's ``load_checkpoint`` on a checkpoint fitted to this model.

        A plain checkpoint in a DeNS model (or a DeNS checkpoint in the plain parent model) loads
        its shared weights and EMA; the trainer state (step, optimizer, scheduler) is then not
        loaded, so training starts a fine-tuning run at step 0.
        """
        if checkpoint is None:
            if not os.path.isfile(checkpoint_path):
                return super().load_checkpoint(checkpoint_path, None, inference_only)
            logging.info(f"Loading checkpoint from: {checkpoint_path}")
            map_location = torch.device("cpu") if self.cpu else self.device
            checkpoint = read_checkpoint(checkpoint_path, map_location)
        fitted = self.fit_checkpoint(checkpoint, checkpoint_path)
        if fitted is not checkpoint and not inference_only:
            logging.info(
                "The checkpoint's model differs in its DeNS modules: its trainer state (step, "
                "optimizer, scheduler) is not loaded; training starts at step 0"
            )
            inference_only = True
        return super().load_checkpoint(
            checkpoint_path, checkpoint=fitted, inference_only=inference_only
        )

    def fit_checkpoint(self, checkpoint: dict[str, Any], path: str) -> dict[str, Any]:
        """The checkpoint with DeNS-only tensors added (fresh) or dropped to fit this model.

        Returns ``checkpoint`` itself when nothing DeNS-specific differs (fairchem then loads it
        as is); raises :class:`InferenceError` when anything else differs.
        """
        model_state = self.model.state_dict()
        state = match_state_dict(model_state, checkpoint["state_dict"])
        wrap = "module." * next(iter(model_state)).count("module")  # as match_state_dict counts

        model_prefixes = [
            f"{name}." for name, module in self.model.named_modules() if is_dens_only(module)
        ]
        dens_heads = _checkpoint_dens_heads(checkpoint)
        checkpoint_prefixes = [f"{wrap}backbone.{name}." for name in DENS_BACKBONE_ATTRIBUTES]
        checkpoint_prefixes += [f"{wrap}output_heads.{name}." for name in dens_heads]

        missing = [k for k in model_state if k not in state]
        unexpected = [k for k in state if k not in model_state]
        fresh = [k for k in missing if k.startswith(tuple(model_prefixes))]
        dropped = [k for k in unexpected if k.startswith(tuple(checkpoint_prefixes))]
        other_missing = [k for k in missing if k not in fresh and not self._is_scale_key(k)]
        other_unexpected = [k for k in unexpected if k not in dropped]
        other_unexpected = [k for k in other_unexpected if not self._is_scale_key(k)]
        strict = self.config.get("task", {}).get("strict_load", True)
        if strict and (other_missing or other_unexpected):
            ours = self.config["model"].get("backbone", {}).get("model", self.config["model"])
            raise InferenceError(
                f"{path}: checkpoint of another model (checkpoint: "
                f"{_checkpoint_model_name(checkpoint)}, config: {ours}): "
                f"{len(other_missing)} model tensors missing from it"
                f"{' (' + _examples(other_missing, wrap) + ')' if other_missing else ''}, "
                f"{len(other_unexpected)} unknown to the model"
                f"{' (' + _examples(other_unexpected, wrap) + ')' if other_unexpected else ''}"
            )
        wrong = [k for k in state if k in model_state and state[k].shape != model_state[k].shape]
        if wrong:
            k = wrong[0]
            raise InferenceError(
                f"{path}: tensor shapes differ from the model of this config: "
                f"'{k.removeprefix(wrap)}' is {tuple(state[k].shape)} in the checkpoint, "
                f"{tuple(model_state[k].shape)} in the model ({len(wrong)} tensors differ); "
                "use the model settings the checkpoint was trained with"
            )
        if not fresh and not dropped:
            return checkpoint

        new_state = {k: v for k, v in state.items() if k not in dropped}
        new_state.update({k: model_state[k] for k in fresh})  # keep the fresh initialisation
        fitted = {**checkpoint, "state_dict": new_state}
        if checkpoint.get("ema") is not None and self.ema is not None:
            names = self._checkpoint_parameter_names(state, dropped, dens_heads, wrap)
            fitted["ema"] = self._fit_ema(checkpoint["ema"], names, path)
        report = []
        if fresh:
            report.append(
                f"DeNS modules not in the checkpoint, freshly initialised: "
                f"{_group(fresh, model_prefixes, wrap)}"
            )
        if dropped:
            report.append(
                f"DeNS modules not in this model, dropped: "
                f"{_group(dropped, checkpoint_prefixes, wrap)}"
            )
        logging.info(f"{path}: {'; '.join(report)}")
        return fitted

    def _is_scale_key(self, key: str) -> bool:
        """fairchem's loader ignores keys of ScaleFactor modules; so do we."""
        parent = key.rsplit(".", 1)[0]
        try:
            return isinstance(self.model.get_submodule(parent), ScaleFactor)
        except AttributeError:
            return False

    def _checkpoint_parameter_names(
        self,
        state: dict[str, torch.Tensor],
        dropped: list[str],
        dens_heads: dict[str, dict[str, Any]],
        wrap: str,
    ) -> list[str]:
        """Names of the checkpoint model's trainable parameters, in its parameter order (the
        order of its EMA weights): the state-dict order, keeping the keys that are trainable
        parameters here, and of the dropped DeNS modules those that are parameters there."""
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if dropped:
            backbone = self._unwrapped_model.backbone
            rebuilt: dict[str, torch.nn.Module] = {}
            for name, build in DENS_BACKBONE_ATTRIBUTES.items():
                if any(k.startswith(f"{wrap}backbone.{name}.") for k in dropped):
                    rebuilt[f"{wrap}backbone.{name}."] = build(backbone)
            for name, head in dens_heads.items():
                if any(k.startswith(f"{wrap}output_heads.{name}.") for k in dropped):
                    config = {k: v for k, v in head.items() if k != "module"}
                    cls = registry.get_model_class(head["module"])
                    rebuilt[f"{wrap}output_heads.{name}."] = cls(backbone, **config)
            for prefix, module in rebuilt.items():
                trainable |= {prefix + n for n, p in module.named_parameters() if p.requires_grad}
        return [k for k in state if k in trainable]

    def _fit_ema(self, ema: dict[str, Any], names: list[str], path: str) -> dict[str, Any]:
        """EMA state whose position-ordered weights follow this model's parameters; a fresh DeNS
        module's EMA starts at its initial weights."""
        shadow = ema["shadow_params"]
        if len(shadow) != len(names):
            raise InferenceError(
                f"{path}: its EMA holds {len(shadow)} tensors, its model {len(names)} trainable "
                "parameters; the EMA weights cannot be matched to parameters"
            )
        by_name = dict(zip(names, shadow, strict=True))
        fitted = []
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            value = by_name.get(name)
            if value is None:
                value = parameter.detach().clone()
            elif value.shape != parameter.shape:
                raise InferenceError(
                    f"{path}: EMA weight of '{name}' is {tuple(value.shape)}, the parameter "
                    f"{tuple(parameter.shape)}"
                )
            fitted.append(value)
        return {**ema, "shadow_params": fitted, "collected_params": []}
