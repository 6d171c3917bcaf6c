"""The cohorts a protocol runs on: its own sites, or one generated cohort per generator seed.

A protocol with a `generate` section names the generator version, mechanism, sizes and split; each
generator seed's cohort is written once under OUT/cohorts/gen<seed>-<plan hash>/ (to a temporary folder,
renamed when complete) and reused while the plan is unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from brainjepa.downstream.protocol import Protocol

log = logging.getLogger(__name__)


def protocol_cohorts(p: Protocol, out_dir: Path, progress: bool) -> list[Protocol]:
    """The protocol once per cohort: itself, or one copy per generator seed on its generated cohort
    (generated under OUT/cohorts/ once, reused while the generator plan is unchanged)."""
    if p.generate is None:
        return [p]
    from sites.acquisition import default_site_specs
    from sites.synth import effects_from_pairs, generate_cohorts

    g = p.generate
    plan = json.dumps(dataclasses.asdict(g), sort_keys=True)
    out = []
    for seed in p.generator_seeds:
        root = out_dir / "cohorts" / f"gen{seed}-{hashlib.sha256(plan.encode()).hexdigest()[:8]}"
        if not (root / ".complete").is_file():
            tmp = root.with_name(root.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("generating cohort %d (%s, generator version %d) under %s", seed, g.mechanism, g.version, root)
            names = [s.name for s in default_site_specs(g.sites)]
            kw = {
                "n_sites": g.sites,
                "subjects_per_site": g.subjects,
                "seed": seed,
                "n_rois": g.rois,
                "duration_s": g.duration,
                "effects": effects_from_pairs(list(g.effects)),
                "mechanism": g.mechanism,
                "version": g.version,
                "progress": progress,
            }
            kept = tuple(n for n in names if n not in g.held_out)
            if kept:
                generate_cohorts(tmp, split=g.split, only=kept, **kw)
            if g.held_out:  # a site's files depend only on the seed and its index: the same cohort
                generate_cohorts(tmp, split=(0.0, 0.0, 1.0), only=g.held_out, **kw)
            (tmp / ".complete").write_text(plan)
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)  # the site YAMLs name their folder relatively: valid after the move
        out.append(p.for_cohort(seed, root))
    return out
