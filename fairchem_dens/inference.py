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
    fairchem's loader, after fitting the checkpoint to the model by name: DDP's ``module.`` prefix
    is removed from the checkpoint's keys (whether it was saved with it or not) and the model's own
    prefix added, every tensor is matched by name, and the EMA entries (a list in the checkpoint
    model's parameter order) are matched to the model's parameters by name (order taken from the
    checkpoint's state dict, each shared tensor once, checked against the weights' shapes). A
    plain EquiformerV2/eSCN checkpoint loads into the DeNS model (the DeNS-only modules keep their
    fresh initialisation) and a DeNS checkpoint loads into the plain parent model (the DeNS-only
    tensors, found by the DeNS-only marker of the checkpoint's head classes and its backbone
    class's ``build_dens_modules``, are dropped); either is reported by module name in one log
    line. The trainer state (optimizer, scheduler, step) is loaded only when the checkpoint's
    trainable parameters are the model's in the same order. Any other mismatch (another
    architecture, other tensor shapes) stops with one line naming the file.

Inference always takes the plain S2EF path: test and relaxation datasets are never corrupted, carry
no DeNS fields, and the force encoding and noise head do not run, so results do not depend on
whether the file carries ``y``/``force`` labels.
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fairchem.core.common import distutils
from fairchem.core.common.registry import registry
from fairchem.core.common.relaxation.optimizers.lbfgs_torch import LBFGS
from fairchem.core.common.utils import pyg2_data_transform
from fairchem.core.datasets.oc22_lmdb_dataset import OC22LmdbDataset
from fairchem.core.modules.scaling.scale_factor import ScaleFactor
from torch_geometric.data import Batch

from fairchem_dens import keys
from fairchem_dens.datasets import find_dens_dataset
from fairchem_dens.dens_only import DeNSOnly, is_dens_only
from fairchem_dens.models.base import dens_lmax

#: File (in ``cmd.results_dir``) with the relaxed energies of ``--mode run-relaxations``.
RELAXED_ENERGIES_FILE = "relaxed_energies.npz"

#: Prefix DistributedDataParallel adds to every state-dict key, once per wrapping.
DDP_PREFIX = "module."

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


def metadata_file(dataset: Any) -> tuple[Path, Path] | None:
    """(where fairchem looks for the ``metadata.npz`` of a dataset's first file, the data path
    to give fairchem's ``make_lmdb_sizes``: the configured ``src``), looking through ``Subset``
    wrappers; None when the dataset names no file."""
    base = _lmdb_dataset(dataset)
    if base is None:
        return None
    paths = getattr(base, "paths", None) or [base.path]
    first = Path(paths[0])
    config = getattr(base, "config", None) or {}
    src = config.get("src")
    data = Path(src) if isinstance(src, (str, os.PathLike)) else first
    if config.get("metadata_path"):
        return Path(config["metadata_path"]), data
    return (first.parent if first.is_file() else first) / "metadata.npz", data


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


def _checkpoint_dens_backbone(checkpoint: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(backbone class, backbone config) of the checkpoint when its backbone is a DeNS one
    (it has ``build_dens_modules``), else (None, {})."""
    backbone = ((checkpoint.get("config") or {}).get("model") or {}).get("backbone") or {}
    try:
        cls = registry.get_model_class(backbone.get("model", ""))
    except Exception:  # a backbone this environment cannot import is no DeNS backbone
        return None, {}
    if not callable(getattr(cls, "build_dens_modules", None)):
        return None, {}
    return cls, backbone


def strip_ddp_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with DDP's ``module.`` prefix removed, as often as every key carries it."""
    while state and all(key.startswith(DDP_PREFIX) for key in state):
        state = {key[len(DDP_PREFIX) :]: value for key, value in state.items()}
    return state


def _unique_parameters(names: Iterable[str], state: dict[str, torch.Tensor]) -> list[str]:
    """``names`` without repeats of a tensor saved under several names (a shared parameter,
    which ``named_parameters()`` and the EMA list once)."""
    seen, unique = set(), []
    for name in names:
        tensor = state[name]
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if tensor.numel() and identity in seen:
            continue
        seen.add(identity)
        unique.append(name)
    return unique


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
        """fairchem's ``load_checkpoint`` on a checkpoint fitted to this model by name.

        Weights and EMA entries are matched to the model's parameters by name, whether the
        checkpoint was saved with DDP's ``module.`` prefix or without. A plain checkpoint in a
        DeNS model (or a DeNS checkpoint in the plain parent model) loads its shared weights and
        EMA; the trainer state (step, optimizer, scheduler) is loaded only when the checkpoint's
        trainable parameters are the model's, in the model's order (fairchem restores the
        optimizer by position), else training starts a fine-tuning run at step 0.
        """
        if checkpoint is None:
            if not os.path.isfile(checkpoint_path):
                return super().load_checkpoint(checkpoint_path, None, inference_only)
            logging.info(f"Loading checkpoint from: {checkpoint_path}")
            map_location = torch.device("cpu") if self.cpu else self.device
            checkpoint = read_checkpoint(checkpoint_path, map_location)
        fitted, same_parameters = self.fit_checkpoint(checkpoint, checkpoint_path)
        if not same_parameters and not inference_only:
            logging.info(
                "The checkpoint's model differs in its parameters (DeNS modules or their order): "
                "its trainer state (step, optimizer, scheduler) is not loaded; training starts "
                "at step 0"
            )
            inference_only = True
        return super().load_checkpoint(
            checkpoint_path, checkpoint=fitted, inference_only=inference_only
        )

    def _wrap_prefix(self) -> str:
        """The prefix DDP wrapping adds to this model's state-dict keys ('' unwrapped)."""
        prefix, module = "", self.model
        while module is not self._unwrapped_model:
            prefix, module = prefix + DDP_PREFIX, module.module
        return prefix

    def fit_checkpoint(self, checkpoint: dict[str, Any], path: str) -> tuple[dict[str, Any], bool]:
        """The checkpoint with its tensors named and ordered as this model's state dict, DeNS-only
        tensors added (fresh) or dropped to fit this model, and its EMA entries matched to the
        model's parameters by name.

        Returns:
            (fitted checkpoint, whether its trainable parameters are exactly the model's, in
            the model's order). Raises :class:`InferenceError` when anything else differs.
        """
        model_state = self.model.state_dict()
        wrap = self._wrap_prefix()
        state = {wrap + k: v for k, v in strip_ddp_prefix(dict(checkpoint["state_dict"])).items()}

        model_prefixes = [
            f"{name}." for name, module in self.model.named_modules() if is_dens_only(module)
        ]
        dens_heads = _checkpoint_dens_heads(checkpoint)
        dens_backbone, backbone_config = _checkpoint_dens_backbone(checkpoint)
        dens_modules = self._checkpoint_dens_modules(
            dens_backbone, backbone_config, dens_heads, wrap
        )
        checkpoint_prefixes = list(dens_modules)

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

        # every model tensor, in the model's order (fairchem's own prefix matching is then a
        # no-op); a tensor the checkpoint lacks keeps the model's (fresh) value
        new_state = {k: state.get(k, model_state[k]) for k in model_state}
        new_state.update({k: v for k, v in state.items() if k in unexpected and k not in dropped})
        fitted = {**checkpoint, "state_dict": new_state}

        names = self._checkpoint_parameter_names(state, dropped, dens_modules)
        ours = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if checkpoint.get("ema") is not None and self.ema is not None:
            fitted["ema"] = self._fit_ema(checkpoint["ema"], names, state, path)
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
        if report:
            logging.info(f"{path}: {'; '.join(report)}")
        return fitted, names == ours

    def _is_scale_key(self, key: str) -> bool:
        """fairchem's loader ignores keys of ScaleFactor modules; so do we."""
        parent = key.rsplit(".", 1)[0]
        try:
            return isinstance(self.model.get_submodule(parent), ScaleFactor)
        except AttributeError:
            return False

    def _checkpoint_dens_modules(
        self,
        backbone_class: Any,
        backbone_config: dict[str, Any],
        dens_heads: dict[str, dict[str, Any]],
        wrap: str,
    ) -> dict[str, Callable[[], torch.nn.Module]]:
        """The checkpoint model's DeNS-only modules by state-dict prefix, each as a function
        that rebuilds it on this model's backbone (to learn its parameter names): the backbone's
        (``build_dens_modules`` of the checkpoint's backbone class) and the noise heads (the
        DeNS-only head classes of the checkpoint's config)."""
        backbone = getattr(self._unwrapped_model, "backbone", None)
        found: dict[str, Callable[[], torch.nn.Module]] = {}
        if backbone is None:
            return found
        if backbone_class is not None:
            flags = {
                key: backbone_config[key]
                for key in ("use_force_encoding", "use_sigma_encoding")
                if key in backbone_config
            }
            modules = backbone_class.build_dens_modules(
                dens_lmax(backbone), backbone.sphere_channels, **flags
            )
            for name, module in modules.items():
                if module is not None:
                    found[f"{wrap}backbone.{name}."] = lambda module=module: module
        for name, head in dens_heads.items():
            config = {k: v for k, v in head.items() if k != "module"}
            cls = registry.get_model_class(head["module"])
            found[f"{wrap}output_heads.{name}."] = lambda cls=cls, config=config: cls(
                backbone, **config
            )
        return found

    def _checkpoint_parameter_names(
        self,
        state: dict[str, torch.Tensor],
        dropped: list[str],
        dens_modules: dict[str, Callable[[], torch.nn.Module]],
    ) -> list[str]:
        """Names of the checkpoint model's trainable parameters, in its parameter order (the
        order of its EMA weights): its state-dict order (pre-order, as ``named_parameters``),
        keeping the keys that are trainable parameters of this model or of the checkpoint's
        DeNS modules that this model lacks, each shared tensor once."""
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        for prefix, build in dens_modules.items():
            if any(k.startswith(prefix) for k in dropped):
                trainable |= {prefix + n for n, p in build().named_parameters() if p.requires_grad}
        return _unique_parameters([k for k in state if k in trainable], state)

    def _fit_ema(
        self,
        ema: dict[str, Any],
        names: list[str],
        state: dict[str, torch.Tensor],
        path: str,
    ) -> dict[str, Any]:
        """EMA state whose weights follow this model's parameters by name; a parameter the
        checkpoint lacks (a fresh DeNS module) starts its EMA at its initial weights."""
        shadow = ema["shadow_params"]
        if len(shadow) != len(names):
            raise InferenceError(
                f"{path}: its EMA holds {len(shadow)} tensors, its model {len(names)} trainable "
                "parameters; the EMA weights cannot be matched to parameters"
            )
        for name, value in zip(names, shadow, strict=True):
            if value.shape != state[name].shape:
                raise InferenceError(
                    f"{path}: its EMA entry for '{name.removeprefix(self._wrap_prefix())}' is "
                    f"{tuple(value.shape)}, the weight {tuple(state[name].shape)}; the EMA "
                    "does not follow the checkpoint's parameter order"
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
