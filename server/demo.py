"""Simulation demo data: generated sites and their shared gradient file (only when no gradient file is set).

`flwr run .` must work from a fresh clone, so the ServerApp generates `demo-sites` synthetic sites
(`sites.synth`) under `sites-dir` once, and the federation's gradient file from their connectivity:
each site contributes only a sum of Fisher-z FC matrices and a count (`brainjepa.gradients.site_fc_sum`),
never its series, as a real federation would. In a real deployment the gradient file is given.
"""

from __future__ import annotations

import logging
from pathlib import Path

from brainjepa.config import PretrainConfig
from brainjepa.gradients import compute_gradients, federated_fc, save_gradients, site_fc_sum
from server.config import FederationConfig

log = logging.getLogger(__name__)


def demo_sites_dir(cfg: FederationConfig) -> Path:
    return Path(cfg.sites_dir or str(Path(cfg.out_dir) / "sites")).resolve()


def prepare_demo_sites(cfg: FederationConfig, pcfg: PretrainConfig, sites_dir: Path) -> Path:
    """Generate the demo sites (if absent) and their gradient file; returns the gradient file's path."""
    from sites.cohort import load_site_series
    from sites.config import load_site_config
    from sites.synth import generate_cohorts

    grad_path = sites_dir / "gradients.npy"
    yamls = sorted(sites_dir.glob("*/*.yaml"))
    if len(yamls) < cfg.demo_sites:
        m = pcfg.model
        duration = max(300.0, 1.3 * m.n_frames * pcfg.data.model_tr)
        log.info("simulation demo: generating %d synthetic sites x %d subjects (%d ROIs, %.0f s scans) in %s",
                 cfg.demo_sites, cfg.demo_subjects, m.n_rois, duration, sites_dir)  # fmt: skip
        yamls = generate_cohorts(sites_dir, n_sites=cfg.demo_sites, subjects_per_site=cfg.demo_subjects,
                                 seed=cfg.seed, n_rois=m.n_rois, duration_s=duration)  # fmt: skip
        grad_path.unlink(missing_ok=True)
    if not grad_path.exists():
        contributions = []
        for y in yamls:
            data = load_site_series(load_site_config(y), model_tr=pcfg.data.model_tr, split="train")
            contributions.append(site_fc_sum(data.series))
        g = compute_gradients(federated_fc(contributions), pcfg.model.gradient_components, seed=cfg.seed)
        save_gradients(grad_path, g)
        log.info("simulation demo: gradient file %s (from %d sites' FC sums)", grad_path, len(contributions))
    return grad_path
