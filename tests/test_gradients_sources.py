"""Gradients: BrainSpace on shipped HCP FC (main vs holdout, conte69), federation sums, metadata, plot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from brainjepa import gradients as G
from brainjepa.errors import DataError
from sites.connectome import brainspace_data_dir

# The gradient file the reference Brain-JEPA release ships (its data/gradient_mapping_450.csv: 450 ROIs x
# 30 components). It is not ours to ship: set BRAINJEPA_REFERENCE_GRADIENTS to a copy to run its check.
_REFERENCE_ENV = os.environ.get("BRAINJEPA_REFERENCE_GRADIENTS", "")
REFERENCE = Path(_REFERENCE_ENV) if _REFERENCE_ENV else None


def component_correlations(a: np.ndarray, b: np.ndarray, n: int = 3) -> np.ndarray:
    """|Pearson r| between matching columns of two (R, k) gradient sets, first `n` -> (n,)."""
    return np.array([abs(np.corrcoef(a[:, i], b[:, i])[0, 1]) for i in range(n)])


def conte69_fc_gradient_parcellated(scale: int = 400, component: int = 0) -> np.ndarray:
    """BrainSpace's shipped conte69 FC gradient `component` averaged into Schaefer-`scale` parcels -> (scale,)."""
    d = brainspace_data_dir()
    grad = np.loadtxt(d / "matrices" / "main_group" / f"conte69_32k_fc_gradient{component}.csv")  # (V,)
    labels = np.loadtxt(d / "parcellations" / f"schaefer_{scale}_conte69.csv", dtype=np.int64)  # (V,) 0 = wall
    ok = (labels > 0) & np.isfinite(grad)
    sums = np.bincount(labels[ok], weights=grad[ok], minlength=scale + 1)[1:]
    counts = np.bincount(labels[ok], minlength=scale + 1)[1:]
    return sums / np.maximum(counts, 1)


@pytest.fixture(scope="module")
def main_holdout():
    gm = G.compute_gradients(G.schaefer400_fc("main"), 30)
    gh = G.compute_gradients(G.schaefer400_fc("holdout"), 30)
    return gm, gh


def test_main_and_holdout_agree_after_alignment(main_holdout):
    gm, gh = main_holdout
    aligned = G.align_gradients(gh, gm)
    r = component_correlations(aligned, gm, 3)
    assert (r > 0.9).all(), r
    # alignment is a rotation: norms of the whole set are kept
    np.testing.assert_allclose(np.linalg.norm(aligned), np.linalg.norm(gh), rtol=1e-5)


def test_first_gradient_matches_brainspace_conte69_gradient(main_holdout):
    gm, _ = main_holdout
    ref = conte69_fc_gradient_parcellated(400, 0)  # (400,) surface gradient averaged in parcels
    assert abs(np.corrcoef(ref, gm[:, 0])[0, 1]) > 0.8


def test_schaefer400_gradient_structure(main_holdout):
    g, _ = main_holdout
    assert g.shape == (400, 30) and g.dtype == np.float32
    norms = np.linalg.norm(g, axis=0)
    assert norms[0] >= norms[2] >= norms[10]


@pytest.mark.skipif(
    REFERENCE is None or not REFERENCE.is_file(),
    reason=f"BRAINJEPA_REFERENCE_GRADIENTS={_REFERENCE_ENV!r}: not a file (set it to the "
    "reference release's gradient_mapping_450.csv)",
)
def test_reference_file_has_the_structure_we_produce(main_holdout):
    ref = G.load_gradients(REFERENCE, n_rois=450, n_components=30)
    gm, _ = main_holdout
    for g in (ref, gm):
        assert np.abs(g.mean(axis=0)).max() < 0.05  # zero-mean columns
        gram = g.T.astype(np.float64) @ g
        off = gram - np.diag(np.diag(gram))
        assert np.abs(off).max() < 0.05 * np.diag(gram).max()  # orthogonal columns
    with pytest.raises(DataError, match="has 450 rows .* the data has 400 ROIs"):
        G.load_gradients(REFERENCE, n_rois=400)


def test_works_for_any_parcellation():
    fc = G.schaefer400_fc("main")[:137, :137]
    g = G.compute_gradients(fc, 10)
    assert g.shape == (137, 10)


def test_federated_fc_equals_pooled_mean():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((6, 6))
    subjects = [mix @ rng.standard_normal((6, int(n))) for n in rng.integers(40, 90, 9)]  # (R, L_i)
    pooled = np.mean([G.fisher_z_fc(s) for s in subjects], axis=0)
    contribs = [G.site_fc_sum(subjects[:2]), G.site_fc_sum(subjects[2:7]), G.site_fc_sum(subjects[7:])]
    assert [c for _, c in contribs] == [2, 5, 2]
    np.testing.assert_allclose(G.federated_fc(contribs), pooled, atol=1e-12)
    # the older cohort helper (equal lengths) agrees
    eq = [s[:, :40] for s in subjects]
    np.testing.assert_allclose(G.group_connectivity(np.stack(eq)), G.federated_fc([G.site_fc_sum(eq)]), atol=1e-5)
    with pytest.raises(DataError, match="ROI-count mismatch"):
        G.federated_fc([contribs[0], (np.zeros((5, 5)), 3)])


def test_metadata_sidecar_and_plot(tmp_path, main_holdout):
    gm, gh = main_holdout
    meta = G.gradient_metadata(gm, "brainspace schaefer-400 group FC (main)", n_components=30)
    for name in ("g.npy", "g.csv"):
        path, side = G.save_gradients_with_metadata(tmp_path / name, gm, meta)
        m = json.loads(side.read_text())
        back = G.load_gradients(path, n_rois=400, n_components=30)
        assert m["checksum"] == G.gradient_checksum(back) and m["n_rois"] == 400
        assert m["method"]["kernel"] == "normalized_angle" and m["method"]["approach"] == "dm"
        assert m["source"].startswith("brainspace")
    from sites.connectome import networks_from_fc

    png = G.plot_gradients(gm, tmp_path / "plots" / "g.png", networks_from_fc(G.schaefer400_fc()))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_align_rejects_roi_mismatch(main_holdout):
    gm, _ = main_holdout
    with pytest.raises(DataError, match="400 ROIs vs 450"):
        G.align_gradients(gm, np.zeros((450, 30)))
