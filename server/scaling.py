"""Federation-wide scaling on the server: one `scaling-stats` round, then one set of statistics for all.

Run config `scaling-scope = "federation"`: before the first pretraining round every connected site
sends the quantile sketch of its training subjects' per-ROI time-means (`sites.scaling_sketch.summarize`:
per-ROI quantiles at fixed levels, plus its subject count; never per-subject values). The server checks
each sketch and combines them once (`sites.scaling_sketch.combine`: the count-weighted mixture of the sites'
CDFs) into one `RobustScaling` (method "federated-sketch"), which the run stores in its checkpoint and
sends with every pretraining round (`brainjepa.federation.contract.scaling_arrays`).
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.serverapp import Grid

from brainjepa.errors import DataError
from brainjepa.federation.contract import SKETCH_LEVELS, SKETCH_QUANTILES, RoundSpec
from server.aggregate import SiteUpdate
from server.config import FederationConfig
from server.exchange import SiteResult, exchange, ok_updates
from sites.scaling import RobustScaling
from sites.scaling_sketch import ScalingSummary, combine

log = logging.getLogger(__name__)


def check_sketch(update: SiteUpdate, n_rois: int) -> str | None:
    """Why a scaling-stats reply is unusable (not exactly a sketch of `n_rois` ROIs and a count), or None."""
    if not (isinstance(update.num_examples, int) and update.num_examples >= 1):
        return f"num-examples must be a subject count >= 1, got {update.num_examples!r}"
    if set(update.sets) != {SKETCH_LEVELS, SKETCH_QUANTILES}:
        return f"a scaling-stats reply carries exactly {[SKETCH_LEVELS, SKETCH_QUANTILES]}, got {sorted(update.sets)}"
    levels, q = update.sets[SKETCH_LEVELS].double().numpy(), update.sets[SKETCH_QUANTILES].double().numpy()
    if levels.ndim != 1 or q.shape != (levels.size, n_rois):
        return f"sketch levels {levels.shape} / quantiles {q.shape}: expected (Q,) and (Q, {n_rois})"
    if not (
        np.isfinite(q).all()
        and levels.size >= 3
        and 0 < levels[0]
        and levels[-1] < 1
        and (np.diff(levels) > 0).all()
        and (np.diff(q, axis=0) >= 0).all()
    ):
        return "sketch: levels must increase inside (0, 1) (at least 3) and quantiles be finite, non-decreasing"
    return None


def sketch_of(update: SiteUpdate) -> ScalingSummary:
    """A checked reply as the site's `ScalingSummary`."""
    return ScalingSummary(
        site=update.site,
        n_subjects=update.num_examples,
        levels=update.sets[SKETCH_LEVELS].double().numpy(),
        quantiles=update.sets[SKETCH_QUANTILES].double().numpy(),
    )


def combine_sketches(updates: list[SiteUpdate]) -> RobustScaling:
    """The federation's statistics from the sites' checked sketch replies (`sites.scaling_sketch.combine`)."""
    return combine([sketch_of(u) for u in updates])


def scaling_stats(grid: Grid, cfg: FederationConfig, spec: RoundSpec, n_rois: int) -> RobustScaling:
    """The scaling-stats round: every connected site's sketch, checked, then combined."""

    def accept(res: SiteResult) -> None:
        if res.status == "ok" and res.update is not None:
            reason = check_sketch(res.update, n_rois)
            if reason:
                res.status, res.detail = "rejected", reason
                log.warning("scaling-stats: reply of site %s rejected: %s", res.site, reason)

    results = exchange(grid, cfg, spec, {}, accept, 1.0, "evaluate")
    ok = ok_updates(results, cfg.min_sites, "scaling-stats round")
    try:
        scaling = combine_sketches(ok)
    except DataError as e:
        raise DataError(f"scaling-stats round: {e}") from e
    log.info(
        "federation-wide scaling from %d site(s), %d subjects (%s): median IQR %.4g, checksum %s",
        len(ok),
        scaling.n_subjects,
        ", ".join(f"{u.site}={u.num_examples}" for u in ok),
        float(np.median(scaling.iqr)),
        scaling.checksum(),
    )
    return scaling
