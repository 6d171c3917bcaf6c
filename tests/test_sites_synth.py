"""Generated cohorts: real on-disk layout, deterministic, fast, loadable through the data contract."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

from brainjepa.errors import DataError
from sites.cohort import load_site_series
from sites.config import load_site_config
from sites.participants import read_participants
from sites.synth import generate_cohorts


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    paths = generate_cohorts(out, n_sites=3, subjects_per_site=12, seed=5, n_rois=50, duration_s=400.0)
    return out, paths


def test_layout_and_contract(small):
    out, paths = small
    assert [p.name for p in paths] == ["site_a.yaml", "site_b.yaml", "site_c.yaml"]
    trs = []
    for p in paths:
        cfg = load_site_config(p)
        assert cfg.data.format == "roi" and cfg.n_rois == 50 and cfg.rois[0].name == "subcortex"
        ss = load_site_series(cfg, model_tr=2.205, min_frames=160)
        assert len(ss) == 12 and ss.n_rois == 50 and ss.tr == 2.205
        assert all(x.dtype == np.float32 and x.shape[0] == 50 and x.shape[1] >= 160 for x in ss.series)
        assert set(ss.phenotypes) == {"age", "sex", "diagnosis", "population"}
        assert set(np.unique(ss.phenotypes["sex"])) <= {0.0, 1.0}
        trs.append(cfg.tr)
        # BOLD-like: positive baseline intensities, fluctuations of about a percent
        x = ss.series[0]
        rel = x.std(axis=1) / x.mean(axis=1)
        assert (x.mean(axis=1) > 100).all() and 0.002 < np.median(rel) < 0.05
    assert len(set(trs)) == 3  # sites differ in TR
    pops = [read_participants(p.parent / "participants.tsv").columns["population"][0] for p in paths]
    assert pops == ["A", "A", "B"]


def test_deterministic_by_seed(tmp_path, small):
    out, _ = small
    again = tmp_path / "again"
    generate_cohorts(again, n_sites=3, subjects_per_site=12, seed=5, n_rois=50, duration_s=400.0)
    assert digest(again) == digest(out)
    other = tmp_path / "other"
    generate_cohorts(other, n_sites=1, subjects_per_site=12, seed=6, n_rois=50, duration_s=400.0)
    a = np.load(out / "site_a" / "roi" / "sub-sitea0000.npy")
    b = np.load(other / "site_a" / "roi" / "sub-sitea0000.npy")
    assert a.shape == b.shape and not np.allclose(a, b)


def test_only_writes_the_same_files_as_the_full_cohort(tmp_path, small):
    out, _ = small
    part = tmp_path / "part"
    paths = generate_cohorts(
        part, n_sites=3, subjects_per_site=12, seed=5, n_rois=50, duration_s=400.0, only=("site_c",)
    )
    assert [p.parent.name for p in paths] == ["site_c"] and sorted(q.name for q in part.iterdir()) == ["site_c"]
    assert digest(part / "site_c") == digest(out / "site_c")  # population B, last of three, byte for byte
    with pytest.raises(DataError, match=r"--only \['site_x'\].*site_a"):
        generate_cohorts(tmp_path / "bad", n_sites=3, subjects_per_site=2, seed=5, n_rois=50, only=("site_x",))


def test_group_fc_follows_brainspace_connectivity(small):
    """The cortical block's mean FC correlates with the (reduced) Schaefer group FC it was built from."""
    from sites.connectome import cortical_fc

    out, paths = small
    ss = load_site_series(load_site_config(paths[0]), model_tr=2.205)
    x = np.stack([s[:, :160] for s in ss.series])[:, 6:]  # (N, 44, T) cortex
    x = x - x.mean(axis=-1, keepdims=True)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    fc = np.einsum("nrt,nst->rs", x, x) / len(x)
    ref = cortical_fc(44)
    iu = np.triu_indices(44, 1)
    assert np.corrcoef(fc[iu], ref[iu])[0, 1] > 0.6


def test_hundreds_of_subjects_in_seconds(tmp_path):
    t = time.perf_counter()
    paths = generate_cohorts(tmp_path, n_sites=2, subjects_per_site=100, seed=0, n_rois=450, duration_s=360.0)
    dt = time.perf_counter() - t
    assert len(list((tmp_path / "site_a" / "roi").glob("*.npy"))) == 100 and len(paths) == 2
    assert dt < 30.0, f"200 subjects x 450 ROIs took {dt:.1f} s"


def test_signal_is_learnable_but_not_trivial(tmp_path):
    """Connectivity-feature logistic regression: sex and diagnosis well above chance, well below perfect."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from brainjepa.gradients import fisher_z_fc

    n_rois = 60
    paths = generate_cohorts(tmp_path, n_sites=3, subjects_per_site=80, seed=1, n_rois=n_rois, duration_s=360.0)
    iu = np.triu_indices(n_rois, 1)
    feats, ph = [], {"sex": [], "diagnosis": [], "population": [], "age": []}
    for p in paths:
        ss = load_site_series(load_site_config(p), model_tr=2.205)
        feats += [fisher_z_fc(s)[iu] for s in ss.series]  # (R(R-1)/2,) per subject
        for k in ph:
            ph[k] += list(ss.phenotypes[k])
    x = np.array(feats)  # (240, 1770)
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
    acc = {
        k: cross_val_score(clf, x, np.array(ph[k]), cv=cv, scoring="balanced_accuracy").mean()
        for k in ("sex", "diagnosis", "population")
    }
    assert 0.65 < acc["sex"] < 0.92, acc  # measured 0.79 (seed 1)
    assert 0.62 < acc["diagnosis"] < 0.92, acc  # measured 0.71
    assert acc["population"] > 0.8, acc  # the two populations are shifted (measured 0.94)
    age = np.array(ph["age"])
    pop = np.array(ph["population"])
    assert age[pop == "B"].mean() - age[pop == "A"].mean() > 0.5


def test_effects_from_key_value_pairs_and_their_errors(tmp_path):
    """`brainjepa synth --effect KEY=VALUE`: values read as YAML, tuples from lists; generator version 1's
    effects are two pairs away and differ from the default; bad keys and kinds are named."""
    from brainjepa.errors import ConfigError
    from sites.synth import Effects, effects_for_version, effects_from_pairs

    old = effects_from_pairs(["sex_gain=0.6", "factor_tau=[1.5, 6]"])
    assert old == Effects(sex_gain=0.6, factor_tau=(1.5, 6.0)) == effects_for_version(1) and old != Effects()
    assert effects_from_pairs(["sex_gain=-0.5"], base=old) == Effects(factor_tau=(1.5, 6.0))  # over a base
    assert effects_from_pairs(["sex_networks=[3, 4]"]).sex_networks == (3, 4)
    for bad, needle in (
        ("sex_gainn=1", "KEY one of"),
        ("sex_gain", "KEY=VALUE"),
        ("factor_tau=[1.5]", "a list of 2 numbers"),
        ("sex_gain=high", "a number"),
    ):
        with pytest.raises(ConfigError, match=needle):
            effects_from_pairs([bad])
    a = generate_cohorts(tmp_path / "new", n_sites=1, subjects_per_site=4, n_rois=20, duration_s=100)[0]
    b = generate_cohorts(tmp_path / "old", n_sites=1, subjects_per_site=4, n_rois=20, duration_s=100, effects=old)[0]
    xa, xb = (np.load(p.parent / "roi" / "sub-sitea0000.npy") for p in (a, b))
    assert xa.shape == xb.shape and not np.allclose(xa, xb)


def test_a_demo_federation_can_acquire_at_the_model_tr(tmp_path):
    """`prepare_federation(site_tr=...)`: every site at that TR, scans as long as the presets' (the federated
    tests use the model TR so that no round resamples); without it each site keeps its preset's TR."""
    from brainjepa.demo import prepare_federation
    from sites.temporal import DEFAULT_MODEL_TR

    kw = dict(n_sites=2, subjects=4, n_rois=20, n_frames=32, n_components=4)
    own = prepare_federation(tmp_path / "own", **kw)
    at = prepare_federation(tmp_path / "at", **kw, site_tr=DEFAULT_MODEL_TR)
    trs = [load_site_config(y).tr for y in own.site_yamls]
    assert len(set(trs)) == 2 and DEFAULT_MODEL_TR not in trs
    for y in at.site_yamls:
        cfg = load_site_config(y)
        assert cfg.tr == DEFAULT_MODEL_TR
        series = load_site_series(cfg, DEFAULT_MODEL_TR).series
        assert series[0].shape == (20, round(300 / DEFAULT_MODEL_TR))  # 5-minute scans, not resampled
