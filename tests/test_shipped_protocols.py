"""Every shipped protocol loads (where its data is generated), pins its generator, and scores the baselines a
reviewer asks for; generated-cohort claims rest on at least 5 generated cohorts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from brainjepa.downstream.protocol import load_protocol
from sites.synth import GENERATOR_VERSION

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted([*ROOT.glob("experiments/**/*.yaml"), *ROOT.glob("configs/protocols/*.yaml")])
PROTOCOLS = [p for p in SHIPPED if "experiments" in (yaml.safe_load(p.read_text()) or {})]


def test_protocols_are_found() -> None:
    assert len(PROTOCOLS) >= 7, [p.relative_to(ROOT) for p in PROTOCOLS]


@pytest.mark.parametrize("path", PROTOCOLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_shipped_protocol_scores_the_baselines(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    assert {"roi_spectrum", "fc", "fc_tangent"} <= set(raw["methods"]), path
    if "generate" not in raw:
        return  # real or externally prepared sites: loading needs their data
    p = load_protocol(path)
    assert p.generate is not None and p.generate.version <= GENERATOR_VERSION
    assert len(p.generator_seeds) >= 5
    assert p.test_site_scaling == "training_sites"
