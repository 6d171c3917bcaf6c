"""Federation-wide scaling (run config `scaling-scope = "federation"`).

Without Flower: the site's `scaling-stats` reply (through a real ArrayRecord) combined by the server
equals `sites.scaling_sketch.combine` of the sites' own summaries; a site applies exactly the statistics it is
sent and refuses statistics of another ROI count; the configurations without a sketch are refused.
Over Flower (SuperLink + 2 SuperNodes on loopback): 1 round x 2 steps with `federation`: the run
finishes, its checkpoint's `scaling` is that combination of the two sites' training series, and what
each site sent in the stats round (its own dump) is the sketch and its count, nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from harness import FLOWER_ENV

from brainjepa.checkpoint import load_checkpoint
from brainjepa.config import PretrainConfig, load_site
from brainjepa.data import pretraining_stream
from brainjepa.demo import DemoFederation, prepare_federation
from brainjepa.errors import ConfigError
from brainjepa.federation.contract import ARRAYS, METRICS, SITE, SKETCH_LEVELS, SKETCH_QUANTILES, Metric, decode_update
from brainjepa.federation.launcher import LocalFederation, write_app_dir
from client.training import RoundRefused, load_site_data, site_sketch
from server.aggregate import SiteUpdate
from server.config import FederationConfig, from_run_config, to_run_config
from server.pretraining import FederatedRun
from server.scaling import check_sketch, combine_sketches
from sites.cohort import Cohort, load_cohort
from sites.scaling import RobustScaling
from sites.scaling_sketch import combine, summarize
from sites.temporal import DEFAULT_MODEL_TR

N_ROIS, N_FRAMES = 40, 64
REPLY_BOOKKEEPING = {Metric.NUM_EXAMPLES, Metric.ROUND_WALL_S, Metric.BYTES_RECEIVED, Metric.BYTES_SENT}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoFederation:
    return prepare_federation(
        tmp_path_factory.mktemp("fed_scaling") / "sites",
        n_sites=2,
        subjects=12,
        n_rois=N_ROIS,
        n_frames=N_FRAMES,
        seed=11,
        site_tr=DEFAULT_MODEL_TR,
    )


def _cfg(demo: DemoFederation, out: Path, **kw: object) -> FederationConfig:
    return FederationConfig(
        n_rois=N_ROIS,
        n_frames=N_FRAMES,
        local_steps=2,
        num_rounds=1,
        batch_size=4,
        gradients=str(demo.gradients),
        out_dir=str(out),
        scaling_scope="federation",
        **kw,
    )  # type: ignore[arg-type]


def _expected(demo: DemoFederation, pcfg: PretrainConfig) -> RobustScaling:
    """The pooled statistics from the sites' own summaries of their unscaled training series."""
    summaries = []
    for y in demo.site_yamls:
        site = load_site(y)[0]
        raw = load_cohort(site, pcfg.data.model_tr, min_frames=N_FRAMES, scaling="none", for_model=False)
        summaries.append(summarize(raw.series, site.site))
    return combine(summaries)


def test_scaling_stats_combine_equals_combine_of_the_sites_summaries(demo: DemoFederation, tmp_path: Path) -> None:
    pcfg = _cfg(demo, tmp_path).pretrain()
    updates = []
    for y in demo.site_yamls:
        site = load_site(y)[0]
        arrays, metrics = site_sketch(site, pcfg)
        wire = ArrayRecord(arrays).to_torch_state_dict()  # what travels, decoded as the server decodes it
        update = SiteUpdate(site.site, int(metrics[Metric.NUM_EXAMPLES]), decode_update(wire, "float16", {}))
        assert check_sketch(update, N_ROIS) is None
        assert update.sets[SKETCH_QUANTILES].shape == (99, N_ROIS) and update.num_examples >= 4
        updates.append(update)
    got, want = combine_sketches(updates), _expected(demo, pcfg)
    assert got.to_dict() == want.to_dict() and got.method == "federated-sketch"

    bad = SiteUpdate("x", 5, {**updates[0].sets, "encoder": torch.zeros(3)})
    assert "exactly" in check_sketch(bad, N_ROIS)
    assert "(Q, 39)" in check_sketch(updates[0], 39)
    flipped = SiteUpdate("x", 5, {**updates[0].sets, SKETCH_QUANTILES: updates[0].sets[SKETCH_QUANTILES].flip(0)})
    assert "non-decreasing" in check_sketch(flipped, N_ROIS)


def test_site_applies_the_federation_statistics_and_refuses_another_roi_count(
    demo: DemoFederation, tmp_path: Path
) -> None:
    pcfg = _cfg(demo, tmp_path).pretrain()
    site = load_site(demo.site_yamls[0])[0]
    rng = np.random.default_rng(0)
    stats = RobustScaling(
        median=rng.normal(size=N_ROIS), iqr=rng.uniform(0.5, 2.0, N_ROIS), n_subjects=30, method="federated-sketch"
    )
    data = load_site_data(site, pcfg, stats)
    raw = load_cohort(site, pcfg.data.model_tr, min_frames=N_FRAMES, scaling="none", for_model=False)
    ref = pretraining_stream(Cohort(stats.apply_all(raw.series), raw.subject_ids, raw.source, stats), pcfg)
    own = load_site_data(site, pcfg)
    assert torch.equal(data.stream[0][0], ref[0][0]) and not torch.equal(data.stream[0][0], own.stream[0][0])

    short = RobustScaling(median=stats.median[:-1], iqr=stats.iqr[:-1], n_subjects=30, method="federated-sketch")
    with pytest.raises(RoundRefused, match=f"statistics for {N_ROIS - 1} ROIs.*has {N_ROIS} ROIs"):
        load_site_data(site, pcfg, short)


def test_federation_scope_without_a_sketch_is_refused(demo: DemoFederation, tmp_path: Path) -> None:
    yaml_path = tmp_path / "pretrain.yaml"
    yaml_path.write_text(f"model: {{n_rois: {N_ROIS}, n_frames: {N_FRAMES}}}\ndata: {{scaling: values}}\n")
    with pytest.raises(ConfigError, match="needs data.scaling 'robust'.*'values'"):  # the YAML decides the model
        FederatedRun.create(
            FederationConfig(
                local_steps=2,
                num_rounds=1,
                batch_size=4,
                gradients=str(demo.gradients),
                out_dir=str(tmp_path / "runs"),
                scaling_scope="federation",
                pretrain_config=str(yaml_path),
            )
        )
    with pytest.raises(ConfigError, match="scaling-scope"):
        FederationConfig(task="finetune", checkpoint="c.pt", downstream_config="d.yaml", scaling_scope="federation")
    with pytest.raises(ConfigError, match="scaling-scope"):
        from_run_config({"scaling-scope": "global"})


@pytest.mark.integration  # SuperLink / SuperNodes as real processes
def test_federation_scaling_over_flower(demo: DemoFederation, tmp_path: Path) -> None:
    cfg = _cfg(demo, tmp_path / "runs")
    dumps = tmp_path / "dumps"
    nodes = [
        {"site-config": str(y), "gradients": str(demo.gradients), "dump-updates-dir": str(dumps)}
        for y in demo.site_yamls
    ]
    with LocalFederation(tmp_path / "flower", nodes, env_extra=FLOWER_ENV) as fed:
        res = fed.run(write_app_dir(tmp_path / "app", to_run_config(cfg)), timeout_s=240)
    assert res.returncode == 0 and "outputs under" in res.stdout, res.stdout[-4000:] + res.stderr[-2000:]
    (ckpt_path,) = list((tmp_path / "runs").glob("*/checkpoint.pt"))
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["round"] == 1 and ckpt["step"] == 2
    assert ckpt["scaling"] == _expected(demo, cfg.pretrain()).to_dict()
    assert ckpt["scaling"]["method"] == "federated-sketch"

    # What each site sent in the stats round: the sketch (levels, quantiles) and its count, nothing else.
    sent = sorted((dumps / "scaling-stats" / "round-001").glob("*.json"))
    assert [p.stem for p in sent] == ["site_a", "site_b"]
    for path in sent:
        reply = json.loads(path.read_text())
        assert reply["records"] == {
            ARRAYS: sorted([SKETCH_LEVELS, SKETCH_QUANTILES]),
            METRICS: sorted(REPLY_BOOKKEEPING),
            SITE: ["name"],
        }, path
        npz = np.load(path.with_suffix(".npz"))
        assert sorted(npz.files) == sorted(["num_examples", SKETCH_LEVELS, SKETCH_QUANTILES])
        assert npz[SKETCH_LEVELS].shape == (99,) and npz[SKETCH_QUANTILES].shape == (99, N_ROIS)
        assert (
            npz[SKETCH_QUANTILES].dtype == np.float64
            and int(npz["num_examples"]) == reply["metrics"][Metric.NUM_EXAMPLES]
        )
    # ... and both then trained the pretraining round.
    assert sorted(p.stem for p in (dumps / "round-001").glob("*.npz")) == ["site_a", "site_b"]
