"""Tests of the MD17-style molecule generator ``fairchem_dens.data molecules`` (GFN2-xTB MD).

The data are read back with fairchem's own ``LmdbDataset``; the labels are checked against a
fresh GFN2-xTB calculation and a finite-difference gradient of its energy.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("tblite")
pytest.importorskip("rdkit")

from fairchem_dens.data import generate_molecules
from fairchem_dens.data.molecules import (
    CELL_MARGIN,
    MOLECULE_TAG,
    MOLECULES,
    canonical_name,
    parse_molecules,
)

LmdbDataset = pytest.importorskip("fairchem.core.datasets").LmdbDataset

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
TEMPERATURE = 500.0
# Tiny ethanol run: 28 frames, 5 fs apart, after 100 fs of equilibration (~1.3 s of MD).
TINY = dict(
    molecules=["ethanol"],
    train=16,
    val=4,
    test=8,
    temperature=TEMPERATURE,
    seed=5,
    spacing=10,
    equilibration=200,
)
# The MD17 formulas (Chmiela et al. 2017) of the eight molecules.
MD17_FORMULAS = {
    "aspirin": "C9H8O4",
    "benzene": "C6H6",
    "ethanol": "C2H6O",
    "malonaldehyde": "C3H4O2",
    "naphthalene": "C10H8",
    "salicylic_acid": "C7H6O3",
    "toluene": "C7H8",
    "uracil": "C4H4N2O2",
}


def _read(path: Path) -> list:
    """All entries of the LMDB at ``path`` (file or folder) through fairchem's LmdbDataset."""
    ds = LmdbDataset({"src": str(path)})
    try:
        return [ds[i] for i in range(len(ds))]
    finally:
        ds.__del__()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("molecules")
    return out, generate_molecules(out, **TINY)


@pytest.fixture(scope="module")
def entries(tiny: tuple[Path, dict]) -> dict[str, list]:
    out, _ = tiny
    return {
        "train": _read(out / "ethanol" / "train"),  # the folder, as trainer configs give it
        "val": _read(out / "ethanol" / "val" / "data.lmdb"),
        "test": _read(out / "ethanol" / "test" / "data.lmdb"),
    }


def test_molecule_table_matches_md17() -> None:
    from rdkit import Chem
    from rdkit.Chem.rdMolDescriptors import CalcMolFormula

    assert set(MOLECULES) == set(MD17_FORMULAS)
    for name, smiles in MOLECULES.items():
        assert CalcMolFormula(Chem.MolFromSmiles(smiles)) == MD17_FORMULAS[name], name
    # malonaldehyde is MD17's (Z)-enol, whose O-H points at the carbonyl O
    mal = Chem.MolFromSmiles(MOLECULES["malonaldehyde"])
    stereo = [b.GetStereo() for b in mal.GetBonds() if b.GetBondType() == Chem.BondType.DOUBLE]
    assert Chem.BondStereo.STEREOZ in stereo or Chem.BondStereo.STEREOCIS in stereo


def test_names_and_aliases() -> None:
    assert canonical_name("Salicylic acid") == "salicylic_acid"
    assert canonical_name("salicylic") == "salicylic_acid"
    assert canonical_name("ETHANOL") == "ethanol"
    assert parse_molecules("ethanol, aspirin,ethanol") == ("ethanol", "aspirin")
    with pytest.raises(ValueError, match=r"unknown molecule 'water' \(known: aspirin, benzene"):
        canonical_name("water")


def test_layout_and_split_sizes(tiny: tuple[Path, dict], entries: dict) -> None:
    out, summary = tiny
    mdir = out / "ethanol"
    for split in SPLITS:
        assert (mdir / split / "data.lmdb").is_file()
        assert not (mdir / split / "data.lmdb-lock").exists()
        natoms = np.load(mdir / split / "metadata.npz")["natoms"]
        np.testing.assert_array_equal(natoms, [d.natoms for d in entries[split]])
        assert len(entries[split]) == TINY[split] == summary["ethanol"]["frames"][split]
    assert (mdir / "stats.json").is_file() and (mdir / "normalizers.yml").is_file()


def test_splits_disjoint_random_and_evenly_spaced(entries: dict) -> None:
    fids = {s: [d.fid for d in entries[s]] for s in SPLITS}
    every = sorted(f for s in SPLITS for f in fids[s])
    n = sum(TINY[s] for s in SPLITS)
    # frame k (k = 1..n) is MD step equilibration + k * spacing: no frame lost or duplicated
    expected = [TINY["equilibration"] + k * TINY["spacing"] for k in range(1, n + 1)]
    assert every == expected
    for s in SPLITS:
        assert fids[s] == sorted(fids[s])  # each split in time order
    # random, not contiguous blocks: every split has frames on both sides of another split's
    pos = {f: i for i, f in enumerate(expected)}
    for s in SPLITS:
        idx = [pos[f] for f in fids[s]]
        assert max(idx) - min(idx) + 1 > len(idx), s


def test_fields_and_nonperiodic_box(tiny: tuple[Path, dict], entries: dict) -> None:
    from ase.data import atomic_masses

    _, summary = tiny
    z_ethanol = sorted([6, 6, 8] + [1] * 6)
    side = summary["ethanol"]["box_side"]
    for split in SPLITS:
        for d in entries[split]:
            n = d.natoms
            assert n == 9 and sorted(d.atomic_numbers.long().tolist()) == z_ethanol
            assert d.pos.dtype == torch.float32 and d.pos.shape == (n, 3)
            assert d.force.dtype == torch.float32 and d.force.shape == (n, 3)
            assert isinstance(d.y, float)
            assert d.atomic_numbers.dtype == torch.float32
            assert d.tags.dtype == torch.int64 and (d.tags == MOLECULE_TAG).all()
            assert d.fixed.dtype == torch.float32 and (d.fixed == 0).all()
            assert d.pbc.dtype == torch.bool and d.pbc.shape == (1, 3) and not d.pbc.any()
            assert torch.equal(d.cell, side * torch.eye(3).view(1, 3, 3))
            assert d.sid == list(MOLECULES).index("ethanol")
            # every periodic image is >= 2 * CELL_MARGIN away from every atom, and the
            # molecule sits inside the box
            diameter = torch.cdist(d.pos.double(), d.pos.double()).max().item()
            assert side - diameter >= 2 * CELL_MARGIN
            assert (d.pos > 0).all() and (d.pos < side).all()
            mass = torch.from_numpy(atomic_masses[d.atomic_numbers.long().numpy()])
            com = (mass[:, None] * d.pos.double()).sum(0) / mass.sum()
            assert torch.allclose(com, torch.full((3,), side / 2, dtype=torch.float64), atol=1e-4)


def test_periodic_graph_equals_molecular_graph(entries: dict) -> None:
    """use_pbc: true sees no periodic image: same edges with the pbc field, without it
    (a fully periodic box) and by brute force within the cutoff."""
    from fairchem.core.common.utils import radius_graph_pbc
    from torch_geometric.data import Batch

    cutoff = 6.0
    batch = Batch.from_data_list(entries["val"])
    assert batch.pbc.shape == (len(entries["val"]), 3)
    edges_pbc_field, offsets, _ = radius_graph_pbc(batch.clone(), cutoff, 1000)
    periodic = batch.clone()
    del periodic.pbc
    edges_periodic, offsets_periodic, _ = radius_graph_pbc(periodic, cutoff, 1000)
    assert not offsets.any() and not offsets_periodic.any()
    dist = torch.cdist(batch.pos.double(), batch.pos.double())
    same = batch.batch[:, None] == batch.batch[None, :]
    brute = (dist < cutoff) & same & ~torch.eye(len(batch.pos), dtype=torch.bool)

    def as_set(e: torch.Tensor) -> set:
        return set(map(tuple, e.t().tolist()))

    expected = set(map(tuple, brute.nonzero().tolist()))
    assert as_set(edges_pbc_field) == expected
    assert as_set(edges_periodic) == expected


# Runs in a fresh interpreter: tblite's C library cannot load after torch in one process.
GFN2_REFERENCE = """
import json, sys
import numpy as np
from ase import Atoms
from tblite.ase import TBLite

z, pos, h, coords = json.loads(sys.stdin.read())
atoms = Atoms(numbers=z, positions=np.array(pos))
atoms.calc = TBLite(method="GFN2-xTB", verbosity=0, accuracy=0.01)
energy, forces = atoms.get_potential_energy(), atoms.get_forces()
fd = []
for atom, axis in coords:
    e = []
    for sign in (1.0, -1.0):
        p = np.array(pos)
        p[atom, axis] += sign * h
        atoms.set_positions(p)
        e.append(atoms.get_potential_energy())
    fd.append(-(e[0] - e[1]) / (2 * h))
print(json.dumps([energy, forces.tolist(), fd]))
"""


def test_labels_are_gfn2_xtb_and_forces_are_minus_gradient(entries: dict) -> None:
    d = entries["test"][3]
    coords = [(0, 0), (2, 1), (8, 2), (5, 0)]
    query = [d.atomic_numbers.long().tolist(), d.pos.double().tolist(), 5e-3, coords]
    res = subprocess.run(
        [sys.executable, "-c", GFN2_REFERENCE],
        input=json.dumps(query),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    energy, forces, fd = json.loads(res.stdout)
    forces = np.array(forces)
    # the stored labels are those of a fresh calculation at the stored (float32) positions
    assert d.y == pytest.approx(energy, abs=1e-3)
    np.testing.assert_allclose(d.force.numpy(), forces, atol=5e-3)
    assert np.linalg.norm(forces, axis=1).max() > 0.3  # a non-equilibrium frame
    # F = -dE/dx by central differences (h = 5e-3 Å) on a few coordinates
    for (atom, axis), value in zip(coords, fd, strict=True):
        assert value == pytest.approx(forces[atom, axis], abs=5e-3)


def test_thermostat_holds_the_temperature() -> None:
    """Langevin holds the target kinetic temperature (ASE's fixcm=True ran ethanol ~30 % hot).

    Equipartition: a 9-atom molecule's kinetic temperature fluctuates by sqrt(2 / 27) = 27 % per
    frame. 150 frames 5 fs apart hold >= ~30 independent samples (velocities decorrelate within
    ~25 fs), so the mean has a relative error <= ~5 %; the 12 % bound is > 2.4 sigma (the run is
    seeded, so the test is deterministic), and the ~30 % of the fixcm=True bug is > 6 sigma.
    """
    import multiprocessing as mp

    from fairchem_dens.data.molecules import run_md

    # a fresh process: tblite's C library cannot load after torch
    with mp.get_context("spawn").Pool(1) as pool:
        traj = pool.apply(run_md, ("ethanol", 150, TEMPERATURE, 11, 10, 0.5, 200, 0.01))
    assert abs(traj.temperatures.mean() / TEMPERATURE - 1.0) < 0.12


def test_md_in_a_torch_process_gives_a_clear_error() -> None:
    from fairchem_dens.data.molecules import run_md, tblite_loadable_here

    if tblite_loadable_here():
        pytest.skip("tblite was loaded before torch in this process")
    with pytest.raises(ImportError, match="tblite cannot load after torch"):
        run_md("ethanol", 1, TEMPERATURE, 0, 1, 0.5, 0, 0.01)


def test_stats_and_normalizers_of_train_split(tiny: tuple[Path, dict], entries: dict) -> None:
    out, _ = tiny
    stats = json.loads((out / "ethanol" / "stats.json").read_text())
    e = np.array([d.y for d in entries["train"]])
    f = torch.cat([d.force for d in entries["train"]]).double().numpy()
    assert stats["num_frames"] == len(e) and stats["split"] == "train"
    assert stats["energy_mean"] == pytest.approx(e.mean(), rel=1e-12)
    assert stats["energy_std"] == pytest.approx(e.std(ddof=1), rel=1e-9)
    assert stats["force_std"] == pytest.approx(math.sqrt((f**2).sum() / len(f)), rel=1e-6)
    norm = yaml.safe_load((out / "ethanol" / "normalizers.yml").read_text())
    n = norm["dataset"]["train"]["transforms"]["normalizer"]
    assert n["energy"] == {"mean": stats["energy_mean"], "rmsd": stats["energy_std"]}
    assert n["forces"] == {"mean": 0.0, "rmsd": stats["force_std"]}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fairchem_dens.data", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def _cli_args(out: Path, params: dict) -> list[str]:
    args = ["molecules", "--out", str(out), "--molecules", *params["molecules"], "--quiet"]
    for key in ("train", "val", "test", "temperature", "seed", "spacing", "equilibration"):
        args += [f"--{key}", str(params[key])]
    return args


def test_cli_deterministic_and_equal_to_api(tiny: tuple[Path, dict], tmp_path: Path) -> None:
    """The CLI (MD in-process) writes the same bytes as the API (MD in a spawned worker)."""
    out, _ = tiny
    res = _cli(*_cli_args(tmp_path / "cli", TINY))
    assert res.returncode == 0, res.stderr
    assert "ethanol (9 atoms): frames train 16 / val 4 / test 8" in res.stdout
    for split in SPLITS:
        a = (out / "ethanol" / split / "data.lmdb").read_bytes()
        assert a == (tmp_path / "cli" / "ethanol" / split / "data.lmdb").read_bytes(), split
    # another seed: other frames
    other = generate_molecules(tmp_path / "other", **{**TINY, "seed": 6})
    a = _read(out / "ethanol" / "train")
    b = _read(Path(other["ethanol"]["paths"]["train"]))
    assert not torch.equal(a[0].pos, b[0].pos)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"molecules": ["water"]}, r"unknown molecule 'water' \(known: aspirin, .*ethanol"),
        ({"molecules": []}, "no molecules"),
        ({"train": 0}, "train"),
        ({"val": -1}, "val"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -300.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"spacing": 0}, "spacing"),
        ({"timestep_fs": 0.0}, "timestep_fs"),
    ],
)
def test_api_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate_molecules(tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()


def test_api_unwritable_out(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="not writable"):
        generate_molecules(blocker / "sub", train=1, val=0, test=0)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--molecules", "ethanol", "water"], "unknown molecule 'water' (known: aspirin,"),
        (["--train", "0"], "--train"),
        (["--val", "-1"], "--val"),
        (["--temperature", "0"], "--temperature"),
        (["--temperature", "-5"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--spacing", "0"], "--spacing"),
        (["--timestep", "0"], "--timestep"),
        (["--friction", "-1"], "--friction"),
        (["--workers", "0"], "--workers"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_cli_bad_arguments(tmp_path: Path, args: list[str], needle: str) -> None:
    res = _cli("molecules", "--out", str(tmp_path / "o"), *args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("fairchem_dens.data: error:") and needle in lines[0]
    assert not (tmp_path / "o" / "ethanol").exists()


def test_cli_unwritable_and_missing_out(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for args, needle in ((["--out", str(blocker / "sub")], "--out"), ([], "--out")):
        res = _cli("molecules", *args)
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert lines[0].startswith("fairchem_dens.data: error:") and needle in lines[0]


def test_cli_subcommand_dispatch() -> None:
    top = _cli("--help")
    assert top.returncode == 0 and "molecules" in top.stdout
    emt = _cli("emt", "--help")
    assert emt.returncode == 0 and "--variant" in emt.stdout
    mol = _cli("molecules", "--help")
    assert mol.returncode == 0 and "--temperature" in mol.stdout and "salicylic_acid" in mol.stdout
