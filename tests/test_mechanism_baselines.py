"""The product baselines on the generator's label mechanisms, scored with the report's intervals: under
`coupling` the per-ROI spectrum reader is at chance within its interval while connectivity is far above;
under `amplitude` the reverse. Trained on one site's training scans, scored on its held-out test scans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from brainjepa.downstream.baselines import fit_baseline
from brainjepa.downstream.config import BaselineConfig, TaskSpec
from brainjepa.downstream.data import load_labelled_site
from brainjepa.downstream.intervals import bootstrap_interval
from sites.config import load_site_config
from sites.synth import generate_cohorts

SEX = TaskSpec("sex", "sex", "classification", ("0", "1"))
TR = 2.205


def _auroc(site, method: str) -> tuple[float, float, float]:
    fitted = fit_baseline(
        method,
        site.train.series,
        site.train.y,
        site.val.series,
        site.val.y,
        kind="classification",
        seed=0,
        tr=TR,
        config=BaselineConfig(),
    )
    scores = fitted.predict_scores(site.test.series, 2)[None]  # (1, N, 2)
    iv = bootstrap_interval(
        site.test.y, scores, np.zeros(len(site.test), dtype=int), kind="classification", metric="auroc", n_boot=1000
    )
    return iv.estimate, iv.lo, iv.hi


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = {}
    for mechanism in ("coupling", "amplitude"):
        root: Path = tmp_path_factory.mktemp(mechanism)
        (yml,) = generate_cohorts(
            root,
            n_sites=1,
            subjects_per_site=160,
            n_rois=30,
            duration_s=400.0,
            seed=3,
            mechanism=mechanism,
            split=(0.5, 0.0, 0.5),
        )
        out[mechanism] = load_labelled_site(load_site_config(yml), SEX, TR, 64, "centered")
    return out


@pytest.mark.slow  # baselines fitted on 80 generated subjects, 1,000 bootstrap draws
def test_coupling_is_read_by_connectivity_and_not_by_the_spectrum(sites: dict) -> None:
    est, lo, hi = _auroc(sites["coupling"], "roi_spectrum")
    assert lo < 0.5 < hi, (est, lo, hi)
    for method in ("fc", "fc_tangent"):
        est, lo, hi = _auroc(sites["coupling"], method)
        assert lo > 0.65, (method, est, lo, hi)


@pytest.mark.slow  # baselines fitted on 80 generated subjects, 1,000 bootstrap draws
def test_amplitude_is_read_by_the_spectrum_and_not_by_connectivity(sites: dict) -> None:
    est, lo, hi = _auroc(sites["amplitude"], "roi_spectrum")
    assert lo > 0.6, (est, lo, hi)  # a +8 % gain on two networks, under each subject's own intensity scale
    est, lo, hi = _auroc(sites["amplitude"], "fc")
    assert lo < 0.5 < hi, (est, lo, hi)
