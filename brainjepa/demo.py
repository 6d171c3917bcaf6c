"""Demo federations: generated sites and their shared gradient file, prepared before Flower starts.

`brainjepa-server simulate` (and the federated tests) call `prepare_federation` first and then hand the
sites' folder and the gradient file to the run config, so neither the ServerApp nor the ClientApp knows
about demos. The gradient file is built as a real federation builds it: each site contributes only a
sum of Fisher-z FC matrices and a count (`brainjepa.gradients.site_contribution`), never its series.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from brainjepa.gradients import compute_gradients, federated_fc, save_gradients, site_contribution
from sites.acquisition import default_site_specs
from sites.config import load_site_config
from sites.synth import generate_cohorts
from sites.temporal import DEFAULT_MODEL_TR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoFederation:
    sites_dir: Path  # one folder per site, each with its site YAML
    site_yamls: list[Path]
    gradients: Path  # the federation's gradient file


def prepare_federation(
    sites_dir: Path,
    n_sites: int,
    subjects: int,
    n_rois: int,
    n_frames: int,
    model_tr: float = DEFAULT_MODEL_TR,
    n_components: int = 30,
    seed: int = 0,
    site_tr: float | None = None,
) -> DemoFederation:
    """Generate `n_sites` synthetic sites under `sites_dir` (kept when already there) and their gradient file.

    Scans last long enough for windows of `n_frames` frames at `model_tr` (at least 5 minutes). `site_tr`:
    every site acquires at this TR instead of its preset's (0.735-2.5 s); at `model_tr` the sites' series
    need no resampling, which tests of other things use to keep each round's process small.
    """
    sites_dir = Path(sites_dir).resolve()
    grad_path = sites_dir / "gradients.npy"
    yamls = sorted(sites_dir.glob("*/*.yaml"))
    if len(yamls) < n_sites:
        duration = max(300.0, 1.3 * n_frames * model_tr)
        log.info(
            "demo: generating %d synthetic sites x %d subjects (%d ROIs, %.0f s scans) in %s",
            n_sites,
            subjects,
            n_rois,
            duration,
            sites_dir,
        )
        specs = default_site_specs(n_sites, duration)
        if site_tr is not None:
            specs = [dataclasses.replace(s, tr=site_tr, n_frames=max(8, round(duration / site_tr))) for s in specs]
        yamls = generate_cohorts(
            sites_dir, n_sites=n_sites, subjects_per_site=subjects, seed=seed, n_rois=n_rois, sites=specs
        )
        grad_path.unlink(missing_ok=True)
    if not grad_path.exists():
        contributions = [site_contribution(load_site_config(y), model_tr) for y in yamls]
        save_gradients(grad_path, compute_gradients(federated_fc(contributions), n_components, seed=seed))
        log.info("demo: gradient file %s (from %d sites' FC sums)", grad_path, len(contributions))
    return DemoFederation(sites_dir, [Path(y) for y in yamls], grad_path)
