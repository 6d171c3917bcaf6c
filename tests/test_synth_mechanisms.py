"""Each label mechanism of the generated cohorts is what it says.

Two readers, cross-validated logistic regression (AUROC): per-ROI log Welch band powers (spectrum and
variance) and Fisher-z correlations after linear detrending. Plus exact checks against the `null`
mechanism, which has the same draws (same seed) and labels that carry nothing.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import signal
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from brainjepa.errors import ConfigError
from sites.participants import read_participants
from sites.synth import GENERATOR_VERSION, Effects, effects_for_version, generate_cohorts, read_generator_record

N, R, DURATION, SEED = 160, 50, 300.0, 0  # one population-A site (TR 0.735 s: 408 frames)
BANDS = (0.01, 0.03, 0.06, 0.1, 0.2, 0.4)  # Hz
LABELS = ("sex", "diagnosis")


def spectrum_features(x: np.ndarray, tr: float) -> np.ndarray:
    """(N, R, L) percent signal change -> (N, R * bands) log Welch band powers."""
    f, p = signal.welch(x, fs=1.0 / tr, nperseg=128, detrend="linear", axis=-1)  # (N, R, F)
    bp = [p[..., (f >= a) & (f < b)].mean(axis=-1) for a, b in zip(BANDS[:-1], BANDS[1:], strict=True)]
    return np.log(np.stack(bp, axis=-1)).reshape(len(x), -1)


def correlation_features(x: np.ndarray) -> np.ndarray:
    """(N, R, L) -> (N, R(R-1)/2) Fisher-z correlations of the linearly detrended series."""
    iu = np.triu_indices(x.shape[1], 1)
    return np.stack([np.arctanh(np.clip(np.corrcoef(signal.detrend(s, axis=-1))[iu], -0.999, 0.999)) for s in x])


def cv_auroc(feats: np.ndarray, y: np.ndarray, c: float) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(roc_auc_score(y, cross_val_predict(clf, feats, y, cv=cv, method="predict_proba")[:, 1]))


def chance_band(y: np.ndarray) -> float:
    """3 SDs of the AUROC of an uninformative score (Mann-Whitney U under H0) for these class sizes:
    0.137 for 80/80 subjects, 0.158 for 40/120 (diagnosis, prevalence 25 %)."""
    n1, n0 = int(y.sum()), int((1 - y).sum())
    return 3.0 * np.sqrt((n0 + n1 + 1) / (12.0 * n0 * n1))


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("mechanisms")
    res = {}
    for m in ("null", "coupling", "amplitude", "spectrum"):
        (yml,) = generate_cohorts(
            out / m, n_sites=1, subjects_per_site=N, seed=SEED, n_rois=R, duration_s=DURATION, mechanism=m
        )
        site = yml.parent
        pt = read_participants(site / "participants.tsv")
        raw = np.stack([np.load(site / "roi" / f"{s}.npy") for s in pt.ids]).astype(np.float64)  # (N, R, L)
        x = raw / raw.mean(axis=-1, keepdims=True) - 1.0  # percent signal change / 100
        rec = read_generator_record(site)
        res[m] = {
            "raw": raw,
            "x": x,
            "y": {k: pt.column(k).astype(int) for k in LABELS},
            "age": pt.column("age"),
            "record": rec,
            "spec": spectrum_features(x, rec["spec"]["tr"]),
            "corr": correlation_features(x),
        }
    return res


def aurocs(c: dict) -> dict[tuple[str, str], float]:
    return {
        (reader, k): cv_auroc(c[reader], c["y"][k], 0.05 if reader == "spec" else 0.01)
        for reader in ("spec", "corr")
        for k in LABELS
    }


def test_coupling_is_read_by_correlations_only(cohorts):
    """Measured (seed 0): spectrum reader sex 0.55, diagnosis 0.43; correlation reader 0.88, 0.92."""
    c = cohorts["coupling"]
    auc = aurocs(c)
    for k in LABELS:
        assert abs(auc["spec", k] - 0.5) < chance_band(c["y"][k]), auc
        assert 0.75 <= auc["corr", k] < 0.99, auc


def test_amplitude_is_read_by_variances_only(cohorts):
    """Measured (seed 0): spectrum reader sex 0.97, diagnosis 0.89; correlation reader 0.45, 0.58."""
    c = cohorts["amplitude"]
    auc = aurocs(c)
    for k in LABELS:
        assert auc["spec", k] >= 0.8, auc
        assert abs(auc["corr", k] - 0.5) < chance_band(c["y"][k]), auc


def test_spectrum_is_read_by_spectra(cohorts):
    """Measured (seed 0): spectrum reader sex 0.87, diagnosis 0.82 (correlation reader 0.46, 0.59);
    0.06-0.1 Hz power of network p in M -0.24 (log), variance -0.016 (log)."""
    c = cohorts["spectrum"]
    auc = aurocs(c)
    for k in LABELS:
        assert auc["spec", k] >= 0.7, auc
    # against the same subjects under `null`: in M the sex network p's driver is slower (power moves from
    # 0.06-0.1 Hz to below), its variance is kept; in F network p is untouched
    spec, null = c, cohorts["null"]
    rec = spec["record"]
    p = np.flatnonzero(np.asarray(rec["networks"]) == rec["effects"]["sex_networks"][0])
    bands = [spectrum_features(m["x"][:, p], rec["spec"]["tr"]).reshape(N, len(p), -1) for m in (spec, null)]
    change = (bands[0] - bands[1]).mean(axis=1)  # (N, 5) log band power change, mean over network p
    male = spec["y"]["sex"] == 1
    assert change[male, 2].mean() < -0.15 and change[male, 0].mean() > 0.0, change[male].mean(axis=0)
    np.testing.assert_array_equal(spec["raw"][np.ix_(~male, p)], null["raw"][np.ix_(~male, p)])
    log_var = np.log(spec["raw"][:, p].var(axis=-1) / null["raw"][:, p].var(axis=-1))  # (N, |p|)
    assert abs(log_var[male].mean()) < 0.05  # vs 2 log(amplitude_gain) = 0.15 under `amplitude`


def test_null_is_read_by_nothing(cohorts):
    """Measured (seed 0): spectrum reader sex 0.58, diagnosis 0.41; correlation reader 0.45, 0.58."""
    c = cohorts["null"]
    auc = aurocs(c)
    for (_, k), a in auc.items():
        assert abs(a - 0.5) < chance_band(c["y"][k]), auc


def test_mechanisms_share_subjects_and_untouched_networks(cohorts):
    """Same seed, same subjects and site effects under every mechanism; coupling and spectrum change only
    the labelled networks' ROIs (byte for byte elsewhere)."""
    null = cohorts["null"]
    rec = null["record"]
    nets = np.asarray(rec["networks"])
    e = rec["effects"]
    touched = np.isin(nets, [*e["sex_networks"], e["dx_network"], e["dx_boost_network"]])  # (R,)
    assert 0 < touched.sum() < R
    for m in ("coupling", "spectrum"):
        c = cohorts[m]
        assert all((c["y"][k] == null["y"][k]).all() for k in LABELS)
        np.testing.assert_array_equal(c["raw"][:, ~touched], null["raw"][:, ~touched])
        assert not np.allclose(c["raw"][:, touched], null["raw"][:, touched])


def test_amplitude_keeps_correlations_exactly(cohorts):
    """Under `amplitude` each ROI's fluctuations are the null's times a gain: correlations equal to float32
    precision; the gain is amplitude_gain on a label's network (x age factor)."""
    amp, null = cohorts["amplitude"], cohorts["null"]
    np.testing.assert_allclose(amp["corr"], null["corr"], atol=2e-3)
    ratio = amp["raw"].std(axis=-1) / null["raw"].std(axis=-1)  # (N, R): same baselines, scaled fluctuations
    rec = amp["record"]
    e, nets = rec["effects"], np.asarray(rec["networks"])
    age = np.clip(1.0 + e["age_amplitude"] * (amp["age"] - 60.0), 0.5, None)  # (N,)
    label = ratio / age[:, None]
    g = e["amplitude_gain"]
    male, patient = amp["y"]["sex"] == 1, amp["y"]["diagnosis"] == 1
    p, q = e["sex_networks"]
    np.testing.assert_allclose(label[np.ix_(male & ~patient, nets == p)], g, rtol=1e-3)
    np.testing.assert_allclose(label[np.ix_(~male & ~patient, nets == q)], g, rtol=1e-3)
    np.testing.assert_allclose(label[np.ix_(~male & patient, nets == e["dx_network"])], 1.0 / g, rtol=1e-3)
    np.testing.assert_allclose(label[np.ix_(~male & ~patient, nets == p)], 1.0, rtol=1e-3)


def test_coupling_keeps_every_roi_variance_and_signs_the_between_network_fc(cohorts):
    """Log variance, M vs F and patients vs controls (Welch t): per ROI |t| < 3.5 (100 tests, about 5 %
    family-wise under H0; measured max 2.3), and for the contrast of the label's two networks |t| < 3
    (measured 1.4, 0.7), where the `amplitude` mechanism gives |t| > 4 (measured 6.0, 7.3). Between the
    label's networks, the mean correlation is higher in M / patients (s = +1) than in F / controls."""

    def tstat(c: dict, k: str, v: np.ndarray) -> np.ndarray:
        a, b = v[c["y"][k] == 1], v[c["y"][k] == 0]
        return (a.mean(0) - b.mean(0)) / np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))

    cp = cohorts["coupling"]
    rec = cp["record"]
    e, nets = rec["effects"], np.asarray(rec["networks"])
    pairs = {"sex": tuple(e["sex_networks"]), "diagnosis": (e["dx_network"], e["dx_boost_network"])}
    for k, (p, q) in pairs.items():
        for c, bound in ((cp, 3.0), (cohorts["amplitude"], 4.0)):
            lv = np.log(c["x"].var(axis=-1))  # (N, R)
            contrast = abs(tstat(c, k, lv[:, nets == p].mean(axis=1) - lv[:, nets == q].mean(axis=1)))
            assert contrast < bound if c is cp else contrast > bound, (k, contrast)
        assert np.abs(tstat(cp, k, np.log(cp["x"].var(axis=-1)))).max() < 3.5, k
    # and as large as without the coupling (the same subjects under `null`): log variance ratio of the
    # coupled networks' ROIs, mean over subjects, within 4 standard errors of 0 (measured max 0.015, 1.9 SE)
    coupled = np.isin(nets, [*pairs["sex"], *pairs["diagnosis"]])
    ratio = np.log(cp["raw"][:, coupled].var(axis=-1) / cohorts["null"]["raw"][:, coupled].var(axis=-1))  # (N, C)
    assert (np.abs(ratio.mean(axis=0)) < 4.0 * ratio.std(axis=0, ddof=1) / np.sqrt(N)).all()
    iu = np.triu_indices(R, 1)
    for k, (p, q) in pairs.items():
        between = ((nets[iu[0]] == p) & (nets[iu[1]] == q)) | ((nets[iu[0]] == q) & (nets[iu[1]] == p))
        fc = cp["corr"][:, between].mean(axis=1)  # (N,)
        y = cp["y"][k]
        assert fc[y == 1].mean() - fc[y == 0].mean() > 0.1, k


def test_versions_reproduce_earlier_generators(tmp_path):
    """Version 1: factor timescales 1.5-6 s, sex strengthens a driver; version 2: the defaults before the
    mechanisms (pinned here, so a changed default needs a new version); version 3 `mixed` = version 2."""
    v2 = dict(
        sex_networks=(1, 2),
        sex_gain=-0.5,
        dx_network=0,
        dx_weaken=0.6,
        dx_boost_network=3,
        dx_boost=0.6,
        dx_slow=1.6,
        sex_slow=1.0,
        factor_tau=(2.0, 30.0),
        driver_tau=3.0,
        age_amplitude=-0.006,
        age_noise=0.006,
        subject_factor_sd=0.25,
        subject_driver_sd=0.25,
        driver_amplitude=0.6,
        pop_b_factor_sd=0.30,
        pop_b_networks=(4, 5),
        pop_b_driver_gain=1.4,
        pop_b_baseline=0.9,
    )
    for version, old in ((1, {**v2, "factor_tau": (1.5, 6.0), "sex_gain": 0.6}), (2, v2), (3, v2)):
        got = dataclasses.asdict(effects_for_version(version))
        assert {k: got[k] for k in old} == old, version
    assert GENERATOR_VERSION == 3 and effects_for_version(2) == Effects()

    def files(root, **kw):
        (yml,) = generate_cohorts(root, n_sites=1, subjects_per_site=3, seed=2, n_rois=20, duration_s=60.0, **kw)
        return {p.name: p.read_bytes() for p in sorted((yml.parent / "roi").iterdir())}, yml

    v1, y1 = files(tmp_path / "v1", version=1)
    explicit, _ = files(tmp_path / "explicit", effects=Effects(factor_tau=(1.5, 6.0), sex_gain=0.6))
    v2f, y2 = files(tmp_path / "v2", version=2)
    v3, y3 = files(tmp_path / "v3")
    assert v1 == explicit and v2f == v3 and v1 != v3
    for yml, version in ((y1, 1), (y2, 2), (y3, 3)):
        rec = json.loads((yml.parent / "synth.json").read_text())
        assert rec["generator_version"] == version and rec["mechanism"] == "mixed"
        assert f"generator version {version}, mechanism mixed" in yml.read_text().splitlines()[0]
    assert read_generator_record(y1)["effects_changed"] == {}  # version 1's own defaults: nothing overridden


def test_bad_mechanism_or_version_is_a_config_error(tmp_path):
    for kw, needle in (
        ({"mechanism": "coupling", "version": 2}, "from generator version 3.*only mixed"),
        ({"mechanism": "phase"}, "one of mixed, coupling"),
        ({"version": 0}, "integer 1..3"),
        ({"version": 4}, "integer 1..3"),
        ({"mechanism": "coupling", "effects": Effects(sex_networks=(2, 2))}, "must differ"),
        ({"effects": Effects(dx_network=7)}, "dx_network: expected network indices 0..6"),
        ({"mechanism": "amplitude", "effects": Effects(amplitude_gain=0.0)}, "amplitude_gain"),
    ):
        with pytest.raises(ConfigError, match=needle):
            generate_cohorts(tmp_path / "bad", n_sites=1, subjects_per_site=2, n_rois=20, duration_s=60.0, **kw)


def test_generator_record_and_cli(tmp_path):
    """`brainjepa synth --mechanism ... --generator-version ... --effect ...`: recorded; refused when too old."""
    import typer
    from typer.testing import CliRunner

    from brainjepa import data_cli

    app = typer.Typer()
    data_cli.register(app)
    runner = CliRunner()
    base = [
        "synth",
        "--out",
        str(tmp_path / "s"),
        "--sites",
        "1",
        "--subjects",
        "2",
        "--rois",
        "20",
        "--duration",
        "60",
        "--no-progress",
    ]
    r = runner.invoke(app, [*base, "--mechanism", "amplitude", "--effect", "amplitude_gain=1.3"])
    assert r.exit_code == 0, r.output
    rec = read_generator_record(tmp_path / "s" / "site_a")
    assert rec["mechanism"] == "amplitude" and rec["generator_version"] == GENERATOR_VERSION
    assert rec["effects_changed"] == {"amplitude_gain": 1.3} and rec["effects"]["amplitude_gain"] == 1.3
    r = runner.invoke(app, [*base, "--mechanism", "coupling", "--generator-version", "2"])
    assert r.exit_code == 2 and "from generator version 3" in r.output
    r = runner.invoke(app, [*base, "--generator-version", "1", "--effect", "sex_gain=0.5"])
    assert r.exit_code == 0, r.output
    rec = read_generator_record(tmp_path / "s" / "site_a" / "site_a.yaml")
    assert rec["generator_version"] == 1 and rec["effects"]["factor_tau"] == [1.5, 6.0]
    assert rec["effects_changed"] == {"sex_gain": 0.5}
    # a real site (no synth.json) has no record; one written before versions were recorded is `mixed`
    (tmp_path / "real").mkdir()
    assert read_generator_record(tmp_path / "real") is None
    old = {k: v for k, v in rec.items() if k not in ("generator_version", "mechanism")}
    (tmp_path / "real" / "synth.json").write_text(json.dumps(old))
    back = read_generator_record(tmp_path / "real")
    assert back["generator_version"] is None and back["mechanism"] == "mixed"
