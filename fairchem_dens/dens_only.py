"""The marker of DeNS-only modules and their separate random stream.

A DeNS model is its fairchem parent plus a few modules that exist only for the auxiliary task
(force encoding, σ encoding, noise heads). They all derive from :class:`DeNSOnly`, so the trainer
(DDP guard), checkpoint loading and inference find them by that one marker, never by a list of
classes. Their weights are drawn from a random stream of their own (:func:`separate_rng`): building
them does not advance the global generator, so the same seed gives a DeNS model whose backbone and
energy/force heads start exactly at the parent model's weights (paired initialisation).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import torch
from torch import nn


class DeNSOnly:
    """Marker base class of modules that exist only in a DeNS model (idle at inference)."""


def is_dens_only(module: nn.Module) -> bool:
    """True for a module that exists only in a DeNS model."""
    return isinstance(module, DeNSOnly)


def dens_only_modules(model: nn.Module) -> list[nn.Module]:
    """The outermost DeNS-only modules of ``model`` (a DeNS-only module's own submodules are
    not listed again)."""
    found: list[nn.Module] = []
    inner: set[int] = set()
    for module in model.modules():
        if id(module) in inner or not is_dens_only(module):
            continue
        found.append(module)
        inner.update(id(sub) for sub in module.modules())
    return found


def dens_only_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the DeNS-only modules of ``model``."""
    return [p for module in dens_only_modules(model) for p in module.parameters()]


@contextlib.contextmanager
def separate_rng(tag: str) -> Iterator[None]:
    """Build modules inside this block from a CPU random stream of their own.

    The stream is seeded from the global generator's initial seed and ``tag`` (so it is
    reproducible per run seed), and the global generator's state is restored on exit: the
    modules built afterwards (the parent's heads) draw exactly what they draw without DeNS.
    """
    seed = (torch.initial_seed() + zlib.crc32(tag.encode())) % 2**63
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
