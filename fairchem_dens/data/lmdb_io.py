"""Write OC20/OC22-format LMDBs of pickled ``torch_geometric.data.Data`` plus ``metadata.npz``.

Format (as read by ``fairchem.core.datasets.LmdbDataset`` / ``OC22LmdbDataset``):

* keys ``b"0" .. b"{N-1}"`` (``f"{i}".encode("ascii")``), values ``pickle.dumps(data, -1)``;
* key ``b"length"`` holding ``pickle.dumps(N)`` (LmdbDataset reads it as the entry count,
  OC22LmdbDataset subtracts one from ``stat()["entries"]`` when it is present);
* ``metadata.npz`` next to the ``.lmdb`` file with ``natoms`` (int32, one per entry, in key order),
  which ``BaseDataset._metadata`` loads from ``path.parent / "metadata.npz"`` for load balancing.

Field dtypes follow the released OC20 S2EF/IS2RE LMDBs (not the newer ``AtomsToGraphs`` defaults):
``pos`` float32 (n, 3), ``cell`` float32 (1, 3, 3), ``atomic_numbers`` float32 (n,), ``natoms``
int, ``tags`` int64 (n,), ``fixed`` float32 (n,), ``force`` float32 (n, 3), ``y`` float (eV),
``sid`` int, ``fid`` int; IS2RE entries carry ``y_init``/``y_relaxed`` float (eV) and
``pos_relaxed`` float32 (n, 3) instead of ``y``/``force``/``fid``.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb
import numpy as np
import torch

if TYPE_CHECKING:
    from torch_geometric.data import Data

LMDB_NAME = "data.lmdb"
METADATA_NAME = "metadata.npz"
_MAP_SIZE = 1 << 36  # 64 GiB of address space; the file only grows to what is written


class _SkipPersistent(pickle.Unpickler):
    """Unpickler that ignores persistent ids (used only to measure pickle lengths)."""

    def persistent_load(self, pid: Any) -> None:
        return None


class DeterministicPickler(pickle.Pickler):
    """Pickler whose output bytes depend only on the pickled values.

    ``torch`` pickles a storage as ``(torch.storage._load_from_bytes, (blob,))`` where ``blob`` is a
    legacy ``torch.save`` of the storage whose internal storage key is ``str(storage._cdata)``, a
    memory address. This pickler emits the same reduction with that key replaced by zeros of the
    same length (the key only links the two places inside ``blob`` that name it), so the stream
    unpickles with plain ``pickle.loads`` to identical tensors, but is reproducible byte for byte.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.storage.TypedStorage):
            untyped = obj._untyped_storage
        elif isinstance(obj, torch.UntypedStorage):
            untyped = obj
        else:
            return NotImplemented
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=False)
        blob = buf.getvalue()
        # Legacy layout: 5 pickles (magic, protocol, sys_info, object, storage keys), then raw data.
        stream = io.BytesIO(blob)
        for _ in range(5):
            _SkipPersistent(stream).load()
        head = stream.tell()
        key = str(untyped._cdata).encode("ascii")
        header = blob[:head].replace(key, b"0" * len(key))
        return (torch.storage._load_from_bytes, (header + blob[head:],))


def dumps(obj: Any) -> bytes:
    """``pickle.dumps(obj, protocol=-1)`` with reproducible bytes for torch tensors."""
    buf = io.BytesIO()
    DeterministicPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def write_lmdb(directory: Path, entries: list[Data]) -> Path:
    """Write ``entries`` to ``directory/data.lmdb`` (replacing it) and ``metadata.npz``.

    All entries are written in one transaction, in order, with :func:`dumps`, so the file bytes
    depend only on the entries. The LMDB lock file is removed afterwards.

    Args:
        directory: output folder (created if missing).
        entries: Data objects, each with an int ``natoms``.

    Returns:
        Path of the written ``data.lmdb``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LMDB_NAME
    for stale in (path, Path(f"{path}-lock")):
        if stale.exists():
            stale.unlink()
    env = lmdb.open(
        str(path), map_size=_MAP_SIZE, subdir=False, meminit=True, map_async=False, lock=True
    )
    try:
        with env.begin(write=True) as txn:
            for i, data in enumerate(entries):
                txn.put(f"{i}".encode("ascii"), dumps(data))
            txn.put(b"length", pickle.dumps(len(entries), protocol=-1))
        env.sync(True)
    finally:
        env.close()
    lock = Path(f"{path}-lock")
    if lock.exists():
        os.unlink(lock)
    natoms = np.array([int(d.natoms) for d in entries], dtype=np.int32)
    np.savez(directory / METADATA_NAME, natoms=natoms)
    return path
