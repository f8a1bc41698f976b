"""Tests of the EMT dataset generator ``fairchem_dens.data``, read back with fairchem's readers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fairchem_dens.data import generate
from fairchem_dens.data.generator import select_frames
from fairchem_dens.data.systems import relax_system

LmdbDataset = pytest.importorskip("fairchem.core.datasets").LmdbDataset
OC22LmdbDataset = pytest.importorskip("fairchem.core.datasets.oc22_lmdb_dataset").OC22LmdbDataset

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
MAX_FORCE = 20.0  # eV/Å, low enough that some initial frames exceed it
SMALL = dict(systems=8, max_steps=12, val_frac=0.25, test_frac=0.25, max_force=MAX_FORCE)


def _read(cls: type, path: Path) -> list:
    """All entries of the LMDB at ``path`` (file or folder) through a fairchem dataset class."""
    ds = cls({"src": str(path)})
    try:
        return [ds[i] for i in range(len(ds))]
    finally:
        ds.__del__() if cls is LmdbDataset else ds.close_db()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gen")
    summary = generate(out, variant="both", seed=3, **SMALL)
    return out, summary


@pytest.fixture(scope="module")
def entries(tiny: tuple[Path, dict]) -> dict[str, dict[str, list]]:
    out, _ = tiny
    res: dict[str, dict[str, list]] = {}
    for variant, cls in (("oc20", LmdbDataset), ("oc22", OC22LmdbDataset)):
        res[variant] = {
            # train through the folder (as trainer configs do), the rest through the file
            "train": _read(cls, out / variant / "train"),
            "val": _read(cls, out / variant / "val" / "data.lmdb"),
            "test": _read(cls, out / variant / "test" / "data.lmdb"),
            "is2re": _read(cls, out / variant / "is2re" / "data.lmdb"),
        }
    return res


def test_layout(tiny: tuple[Path, dict]) -> None:
    out, summary = tiny
    for variant in ("oc20", "oc22"):
        for split in (*SPLITS, "is2re"):
            assert (out / variant / split / "data.lmdb").is_file()
            assert (out / variant / split / "metadata.npz").is_file()
            assert not (out / variant / split / "data.lmdb-lock").exists()
        assert (out / variant / "stats.json").is_file()
        assert (out / variant / "normalizers.yml").is_file()
        assert summary[variant]["systems"] == {"train": 4, "val": 2, "test": 2, "is2re": 4}
    assert (out / "oc22" / "element_references.npz").is_file()
    assert not (out / "oc20" / "element_references.npz").exists()


@pytest.mark.parametrize("variant", ["oc20", "oc22"])
def test_s2ef_fields_and_dtypes(entries: dict, tiny: tuple[Path, dict], variant: str) -> None:
    _, summary = tiny
    for split in SPLITS:
        data = entries[variant][split]
        assert len(data) == summary[variant]["frames"][split] > 0
        for d in data:
            n = d.natoms
            assert isinstance(n, int) and n == d.pos.shape[0]
            assert d.pos.dtype == torch.float32 and d.pos.shape == (n, 3)
            assert d.cell.dtype == torch.float32 and d.cell.shape == (1, 3, 3)
            assert d.atomic_numbers.dtype == torch.float32 and d.atomic_numbers.shape == (n,)
            assert d.tags.dtype == torch.int64 and d.tags.shape == (n,)
            assert d.fixed.dtype == torch.float32 and d.fixed.shape == (n,)
            assert isinstance(d.sid, int) and isinstance(d.fid, int)
            assert "pbc" not in d  # the released OC20/OC22 LMDBs have no pbc field
            if split == "test":
                assert "y" not in d and "force" not in d
            else:
                assert isinstance(d.y, float)
                assert d.force.dtype == torch.float32 and d.force.shape == (n, 3)
            z = d.atomic_numbers.long()
            ads = d.tags == 2
            assert ads.any() and set(z[ads].tolist()) <= {1, 6, 7, 8}
            assert not set(z[~ads].tolist()) & {1, 6, 7, 8}
            assert (d.fixed[ads] == 0).all()  # adsorbates are free
            assert (d.tags[d.fixed == 1] == 0).all()  # fixed atoms are subsurface
            if variant == "oc20":
                assert (d.fixed == 1).any() and torch.equal(d.fixed == 1, d.tags == 0)
            else:
                assert (d.fixed == 0).all() and d.oc22 == 1


@pytest.mark.parametrize("variant", ["oc20", "oc22"])
def test_forces_nonequilibrium_and_threshold(entries: dict, variant: str) -> None:
    fnorm = [
        d.force.norm(dim=1).max().item() for s in ("train", "val") for d in entries[variant][s]
    ]
    assert max(fnorm) <= MAX_FORCE + 1e-5
    # non-equilibrium frames: most frames carry sizeable forces
    assert np.median(fnorm) > 0.05 and max(fnorm) > 1.0


def test_dropped_frames_match_unfiltered_run(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    """Same seed, no threshold: the filtered run is exactly the unfiltered frames with
    max |F| <= threshold, and the reported dropped count is the number of the others."""
    _, summary = tiny
    args = {**SMALL, "max_force": 1e6}
    full = generate(tmp_path, variant="oc20", seed=3, **args)
    assert full["oc20"]["dropped"] == 0
    kept = _read(LmdbDataset, tmp_path / "oc20" / "train")
    over = [d.force.norm(dim=1).max().item() > MAX_FORCE for d in kept]
    filtered = _read(LmdbDataset, Path(summary["oc20"]["paths"]["train"]))
    assert len(filtered) == len(kept) - sum(over)
    want = [(d.sid, d.fid) for d, o in zip(kept, over, strict=True) if not o]
    assert [(d.sid, d.fid) for d in filtered] == want
    assert summary["oc20"]["dropped"] >= sum(over)


def test_select_frames_threshold_and_subsampling() -> None:
    traj = relax_system(0, "oc20", 1, ("Cu",), max_steps=10)
    fmax = np.linalg.norm(traj.forces, axis=2).max(axis=1)
    thr = float(np.median(fmax))
    keep, dropped, sub = select_frames(traj, thr, None)
    assert dropped == int((fmax > thr).sum()) > 0 and sub == 0
    assert (fmax[keep] <= thr).all()
    keep3, _, sub3 = select_frames(traj, 1e9, 3)
    assert len(keep3) == 3 and keep3[0] == 0 and keep3[-1] == len(fmax) - 1
    assert sub3 == len(fmax) - 3


@pytest.mark.parametrize("variant", ["oc20", "oc22"])
def test_splits_and_is2re(entries: dict, variant: str) -> None:
    e = entries[variant]
    sids = {s: {d.sid for d in e[s]} for s in SPLITS}
    assert not sids["train"] & sids["val"]
    assert not sids["train"] & sids["test"]
    assert not sids["val"] & sids["test"]
    is2re = e["is2re"]
    assert [d.sid for d in is2re] == sorted(sids["val"] | sids["test"])
    first = {(d.sid): d for s in ("val", "test") for d in e[s] if d.fid == 0}
    for d in is2re:
        n = d.natoms
        assert isinstance(d.y_init, float) and isinstance(d.y_relaxed, float)
        assert d.y_relaxed < d.y_init  # BFGS lowered the energy
        assert d.pos_relaxed.dtype == torch.float32 and d.pos_relaxed.shape == (n, 3)
        assert d.pos.dtype == torch.float32 and d.pos.shape == (n, 3)
        assert "y" not in d and "force" not in d
        if d.sid in first:  # the initial frame survived the force filter
            assert torch.equal(first[d.sid].pos, d.pos)
            if "y" in first[d.sid]:
                assert first[d.sid].y == d.y_init


@pytest.mark.parametrize("variant", ["oc20", "oc22"])
def test_metadata_natoms(tiny: tuple[Path, dict], entries: dict, variant: str) -> None:
    out, _ = tiny
    for split in (*SPLITS, "is2re"):
        meta = np.load(out / variant / split / "metadata.npz")
        assert np.issubdtype(meta["natoms"].dtype, np.integer)
        assert meta["natoms"].tolist() == [d.natoms for d in entries[variant][split]]
    # fairchem's own metadata loader (used by load_balancing: atoms) finds and accepts it
    ds = LmdbDataset({"src": str(out / variant / "train" / "data.lmdb")})
    try:
        assert ds.metadata_hasattr("natoms")
        assert ds.get_metadata("natoms", 0) == ds[0].natoms
    finally:
        ds.__del__()


@pytest.mark.parametrize("variant", ["oc20", "oc22"])
def test_stats_match_train_lmdb(tiny: tuple[Path, dict], entries: dict, variant: str) -> None:
    out, _ = tiny
    stats = json.loads((out / variant / "stats.json").read_text())
    train = entries[variant]["train"]
    e = np.array([d.y for d in train])
    f = np.concatenate([d.force.numpy().astype(np.float64) for d in train])
    assert stats["num_frames"] == len(train)
    assert stats["total_energy_mean"] == pytest.approx(e.mean(), rel=1e-12)
    assert stats["total_energy_std"] == pytest.approx(e.std(ddof=1), rel=1e-12)
    if variant == "oc22":
        counts = np.stack(
            [np.bincount(d.atomic_numbers.long().numpy(), minlength=119) for d in train]
        ).astype(np.float64)
        mask = counts.sum(0) > 0
        coeff = np.zeros(119)
        coeff[mask] = np.linalg.lstsq(counts[:, mask], e, rcond=None)[0]
        refs = np.load(out / "oc22" / "element_references.npz")
        np.testing.assert_allclose(refs["element_references"], coeff, atol=1e-8)
        np.testing.assert_array_equal(refs["coeff"], refs["element_references"])
        e = e - counts @ coeff
        assert stats["energy_target"].startswith("referenced")
    else:
        assert stats["energy_target"] == "total energy"
    assert stats["energy_mean"] == pytest.approx(e.mean(), rel=1e-9, abs=1e-9)
    assert stats["energy_std"] == pytest.approx(e.std(ddof=1), rel=1e-9)
    assert stats["force_mean"] == 0.0
    assert stats["force_std"] == pytest.approx(np.sqrt((f**2).sum() / len(f)), rel=1e-9)
    assert stats["force_rms_component"] == pytest.approx(np.sqrt((f**2).mean()), rel=1e-9)
    norm = yaml.safe_load((out / variant / "normalizers.yml").read_text())
    tr = norm["dataset"]["train"]["transforms"]
    assert tr["normalizer"]["energy"] == {"mean": stats["energy_mean"], "rmsd": stats["energy_std"]}
    assert tr["normalizer"]["forces"] == {"mean": 0.0, "rmsd": stats["force_std"]}
    assert ("element_references" in tr) == (variant == "oc22")


@pytest.mark.parametrize("variant", ["oc20", "oc22"])
def test_normalizers_equal_fairchem_fit(tiny: tuple[Path, dict], variant: str) -> None:
    """The written values equal what fairchem 1.10's own fitting computes on the train LMDB,
    and the YAML blocks load through fairchem's create_* functions."""
    from fairchem.core.modules.normalization.element_references import (
        create_element_references,
        fit_linear_references,
    )
    from fairchem.core.modules.normalization.normalizer import (
        create_normalizer,
        fit_normalizers,
    )

    out, _ = tiny
    cls = LmdbDataset if variant == "oc20" else OC22LmdbDataset
    ds = cls(
        {"src": str(out / variant / "train"), "key_mapping": {"y": "energy", "force": "forces"}}
    )
    try:
        tr = yaml.safe_load((out / variant / "normalizers.yml").read_text())["dataset"]["train"]
        tr = tr["transforms"]
        elementrefs = {}
        if variant == "oc22":
            loaded = create_element_references(**tr["element_references"]["energy"])
            fitted = fit_linear_references(["energy"], ds, batch_size=16, log_metrics=False)
            torch.testing.assert_close(
                loaded.element_references.float(),
                fitted["energy"].element_references,
                atol=2e-3,
                rtol=1e-4,
            )
            elementrefs = {"energy": loaded}
        # One target per call: fit_normalizers keeps the rmsd_correction chosen for the first
        # target (1 for energy) for the following ones, so a joint call would use N-1 for forces.
        fit = {
            target: fit_normalizers(
                [target],
                ds,
                batch_size=16,
                override_values={"forces": {"mean": 0.0}},
                element_references=elementrefs,
            )[target]
            for target in ("energy", "forces")
        }
        for target in ("energy", "forces"):
            written = create_normalizer(**tr["normalizer"][target])
            assert written.mean.item() == pytest.approx(fit[target].mean.item(), abs=1e-3)
            assert written.rmsd.item() == pytest.approx(fit[target].rmsd.item(), rel=1e-4)
    finally:
        ds.__del__() if cls is LmdbDataset else ds.close_db()


def test_deterministic(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = tiny
    # same args and seed (and a different worker count): identical LMDB bytes
    again = tmp_path / "same"
    generate(again, variant="oc22", seed=3, workers=2, **SMALL)
    for split in (*SPLITS, "is2re"):
        a = (out / "oc22" / split / "data.lmdb").read_bytes()
        assert a == (again / "oc22" / split / "data.lmdb").read_bytes(), split
        m1 = np.load(out / "oc22" / split / "metadata.npz")["natoms"]
        np.testing.assert_array_equal(
            m1, np.load(again / "oc22" / split / "metadata.npz")["natoms"]
        )
    assert (out / "oc22" / "stats.json").read_text() == (again / "oc22" / "stats.json").read_text()
    # different seed: different data
    other = tmp_path / "other"
    generate(other, variant="oc22", seed=4, **SMALL)
    a = _read(OC22LmdbDataset, out / "oc22" / "train" / "data.lmdb")
    b = _read(OC22LmdbDataset, other / "oc22" / "train" / "data.lmdb")
    assert (out / "oc22" / "train" / "data.lmdb").read_bytes() != (
        other / "oc22" / "train" / "data.lmdb"
    ).read_bytes()
    assert len(a) != len(b) or any(
        x.pos.shape != y.pos.shape or not torch.equal(x.pos, y.pos)
        for x, y in zip(a, b, strict=True)
    )


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fairchem_dens.data", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_cli_generates(tmp_path: Path) -> None:
    res = _cli("--out", str(tmp_path), "--variant", "oc20", "--systems", "4", "--max-steps", "5")
    assert res.returncode == 0, res.stderr
    assert "oc20: 4 systems" in res.stdout and "dropped" in res.stdout
    assert (tmp_path / "oc20" / "train" / "data.lmdb").is_file()
    assert not (tmp_path / "oc22").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--metals", "Cu,Xx"], "'Xx'"),
        (["--systems", "0"], "--systems"),
        (["--systems", "-2"], "--systems"),
        (["--max-steps", "0"], "--max-steps"),
        (["--frames-per-system-max", "0"], "--frames-per-system-max"),
        (["--max-force", "-1"], "--max-force"),
        (["--workers", "0"], "--workers"),
        (["--seed", "-1"], "--seed"),
        (["--val-frac", "0.6", "--test-frac", "0.5"], "--val-frac"),
        (["--test-frac", "1.5"], "--test-frac"),
        (["--variant", "oc99"], "--variant"),
        (["--systems", "2", "--val-frac", "0.3", "--test-frac", "0.3"], "no train"),
    ],
)
def test_cli_bad_arguments(tmp_path: Path, args: list[str], needle: str) -> None:
    res = _cli("--out", str(tmp_path / "o"), *args)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert lines[0].startswith("fairchem_dens.data: error:") and needle in lines[0]
    assert not (tmp_path / "o" / "oc20").exists()


def test_cli_unwritable_and_missing_out(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for args, needle in (([f"--out={blocker / 'sub'}"], "--out"), ([], "--out")):
        res = _cli(*args)
        assert res.returncode != 0
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert needle in lines[0]
