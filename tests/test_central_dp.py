"""Central DP on the server (`server.central_dp`), the run folder's privacy report and the run-config
checks, without Flower processes (the real-process runs are in tests/test_secagg.py).

- clipping: each site's delta (encoder + predictor, one L2 norm) is scaled to at most C, below C it is
  untouched, the sample count is ignored (fixed weights), and the sum is the sum of the clipped deltas;
- noise: std z C / m on the released mean (m = sites sampled), from the generator given;
- the released target is the EMA of the NOISY encoder (the sites' targets are never used);
- epsilon equals an independent computation with Opacus' RDP analysis for the same (q, z, rounds), and
  survives a checkpoint round trip (state_dict -> a new CentralDP) and a coordinator restart (a run
  resumed from its checkpoint);
- the privacy report holds each site's reported figures and central DP's block, written by rename;
- SecAgg+'s unmasked mean feeds the round: the weighted-mean weights, or (central DP) the clipped sum.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from brainjepa.errors import ConfigError
from brainjepa.federation.contract import Metric
from brainjepa.federation.secure import delta_norm, secagg_tolerance
from brainjepa.gradients import save_gradients
from client.secagg import SecureRoundError, check_secure_payload
from server.aggregate import RunningMean, SiteUpdate
from server.central_dp import CentralDP, CentralDPParams, ClippedSum, ema_target, noisy_mean
from server.config import FederationConfig
from server.exchange import SiteResult
from server.privacy_report import PrivacyReport
from server.secagg import SecureRound, add_secure_sum

P_ENC, P_PRED, P_TGT = 300, 200, 300


def _sets(g: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {
        "encoder": torch.randn(P_ENC, generator=g) * scale,
        "predictor": torch.randn(P_PRED, generator=g) * scale,
        "target": torch.randn(P_TGT, generator=g) * scale,
    }


def test_clipping_bounds_every_site_and_ignores_sample_counts() -> None:
    g = torch.Generator().manual_seed(0)
    current = _sets(g)
    deltas = [_sets(g, 0.001), _sets(g, 0.5), _sets(g, 3.0)]  # norms ~0.02, ~11, ~67
    clip = 1.0
    acc = ClippedSum(current, clip)
    for i, d in enumerate(deltas):
        acc.add({k: current[k] + d[k] for k in current}, n=[5, 500, 50000][i])
    assert acc.count == 3 and acc.norms[0] < clip < acc.norms[1] < acc.norms[2]
    want = {k: torch.zeros(current[k].numel(), dtype=torch.float64) for k in ("encoder", "predictor")}
    for d in deltas:
        norm = math.sqrt(sum(float(d[k].double().square().sum()) for k in want))
        assert norm == pytest.approx(delta_norm(d), rel=1e-9)
        factor = min(1.0, clip / norm)
        clipped = {k: d[k].double() * factor for k in want}
        assert delta_norm(clipped) <= clip * (1 + 1e-6)  # no clipped update exceeds the bound
        if factor == 1.0:
            assert torch.equal(clipped["encoder"], d["encoder"].double())
        for k in want:
            want[k] += clipped[k]
    for k in want:
        torch.testing.assert_close(acc.sums[k], want[k], rtol=1e-6, atol=1e-7)
    assert set(acc.sums) == {"encoder", "predictor"}  # the target is not summed


def test_noise_std_is_z_c_over_sampled_and_comes_from_the_generator() -> None:
    params = CentralDPParams(noise_multiplier=1.3, clip_norm=0.7, delta=1e-5)
    sums = {"encoder": torch.zeros(200_000, dtype=torch.float64), "predictor": torch.zeros(10, dtype=torch.float64)}
    a = noisy_mean(sums, 4, params, torch.Generator().manual_seed(1))
    b = noisy_mean(sums, 4, params, torch.Generator().manual_seed(1))
    c = noisy_mean(sums, 4, params, torch.Generator().manual_seed(2))
    assert torch.equal(a["encoder"], b["encoder"]) and not torch.equal(a["encoder"], c["encoder"])
    assert float(a["encoder"].std()) == pytest.approx(1.3 * 0.7 / 4, rel=0.01)
    assert abs(float(a["encoder"].mean())) < 0.01 and a["encoder"].dtype == torch.float32


def test_release_recomputes_the_target_from_the_noisy_encoder() -> None:
    g = torch.Generator().manual_seed(3)
    current = _sets(g)
    dp = CentralDP(CentralDPParams(1.0, 1.0, 1e-5), torch.Generator().manual_seed(4))
    acc = dp.new_sum(current)
    site = {k: current[k] + 0.01 for k in current}
    site["target"] = torch.full((P_TGT,), 1e6)  # a site's target never reaches the release
    acc.add(site, 10)
    momenta = [0.996, 0.9962, 0.9964]
    new = dp.release(acc, current, sampled=2, population=2, momenta=momenta)
    mu = 0.996 * 0.9962 * 0.9964
    torch.testing.assert_close(new["target"], current["target"] * mu + new["encoder"] * (1 - mu))
    torch.testing.assert_close(ema_target(current["target"], new["encoder"], momenta), new["target"])
    assert float(new["target"].abs().max()) < 10
    # the released encoder = current + (clipped delta + noise) / 2: its distance to current + delta / 2 is noise
    noise = (new["encoder"] - current["encoder"]) * 2 - 0.01
    assert 0.5 < float(noise.std()) < 1.5


def test_epsilon_equals_an_independent_opacus_computation_and_survives_a_restart() -> None:
    params = CentralDPParams(noise_multiplier=1.1, clip_norm=1.0, delta=1e-5)
    g = torch.Generator().manual_seed(5)
    current = _sets(g)
    dp = CentralDP(params, torch.Generator().manual_seed(6))
    for _ in range(6):
        dp.release(dp.new_sum(current), current, sampled=2, population=4, momenta=[0.99])
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=0.5, noise_multiplier=1.1, steps=6, orders=orders)
    want, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert dp.epsilon() == pytest.approx(want, rel=1e-9) and 1.0 < want < 100.0
    assert dp.summary()["epsilon"] == dp.epsilon() and dp.summary()["rounds"] == 6

    resumed = CentralDP(params)  # a coordinator restart: the accountant comes from the checkpoint
    resumed.load_state_dict(json.loads(json.dumps(dp.state_dict())))
    assert resumed.epsilon() == dp.epsilon()
    resumed.release(resumed.new_sum(current), current, sampled=2, population=4, momenta=[0.99])
    rdp7 = compute_rdp(q=0.5, noise_multiplier=1.1, steps=7, orders=orders)
    assert resumed.epsilon() == pytest.approx(get_privacy_spent(orders=orders, rdp=rdp7, delta=1e-5)[0], rel=1e-9)
    assert resumed.epsilon() > dp.epsilon()


def test_run_config_checks() -> None:
    with pytest.raises(ConfigError, match="central-dp-noise-multiplier"):
        FederationConfig(central_dp=True, central_dp_noise_multiplier=0.0)
    with pytest.raises(ConfigError, match="'median' with 'central-dp'"):
        FederationConfig(central_dp=True, strategy="median")
    with pytest.raises(ConfigError, match="'trimmed-mean' with 'secure-aggregation'"):
        FederationConfig(secure_aggregation=True, strategy="trimmed-mean")
    with pytest.raises(ConfigError, match="min-sites' >= 2"):
        FederationConfig(secure_aggregation=True, min_sites=1)
    with pytest.raises(ConfigError, match="pretraining runs, not task 'finetune'"):
        FederationConfig(secure_aggregation=True, task="finetune", checkpoint="c.pt", downstream_config="d.yaml")
    FederationConfig(central_dp=True, secure_aggregation=True, strategy="fedadam")


def test_site_refuses_what_secagg_would_silently_clip() -> None:
    delta = {"encoder": torch.tensor([0.01, -0.04]), "predictor": torch.tensor([0.02])}
    check_secure_payload(delta, weight=16, max_weight=16, clip_range=0.05)
    with pytest.raises(SecureRoundError, match="weighted update reaches 0.08.*clip-range 0.05"):
        check_secure_payload({**delta, "predictor": torch.tensor([0.08])}, 16, 16, 0.05)
    with pytest.raises(SecureRoundError, match="num-examples\\) 17 is above.*max-weight 16"):
        check_secure_payload(delta, 17, 16, 0.05)
    # Flower's quantization step 2 x range / 2**22, over the quantized weight sum
    assert secagg_tolerance(0.05, [10, 6], 16) == pytest.approx(1.5 * 2 * (0.1 / 2**22) / 1.0)


def test_privacy_report_per_site_and_central(tmp_path: Path) -> None:
    report = PrivacyReport(tmp_path, secure_aggregation=True)
    dp_metrics = {
        Metric.NUM_EXAMPLES: 9.0,
        Metric.EPSILON_SPENT: 2.5,
        Metric.EPSILON_BUDGET: 8.0,
        Metric.DELTA: 1e-5,
        Metric.DP_NOISE_MULTIPLIER: 1.2,
        Metric.DP_MAX_GRAD_NORM: 1.0,
        Metric.DP_SAMPLE_RATE: 0.25,
        Metric.DP_STEPS: 8.0,
        Metric.ROUNDS_DONE: 2.0,
    }
    results = [
        SiteResult(1, "ok", "site_a", update=SiteUpdate("site_a", 9, {}, dp_metrics)),
        SiteResult(2, "ok", "site_b", update=SiteUpdate("site_b", 7, {}, {Metric.NUM_EXAMPLES: 7.0})),
        SiteResult(3, "declined", "site_c", detail="site declined the round: budget 8 spent"),
    ]
    dp = CentralDP(CentralDPParams(1.0, 0.5, 1e-5), torch.Generator().manual_seed(0))
    current = _sets(torch.Generator().manual_seed(1))
    dp.release(dp.new_sum(current), current, 3, 3, [0.99])
    report.update(1, results, dp.summary())
    data = json.loads((tmp_path / "privacy.json").read_text())
    a, b, c = (data["sites"][s] for s in ("site_a", "site_b", "site_c"))
    assert a == {
        "site": "site_a",
        "last_round": 2,
        "status": "ok",
        "epsilon": 2.5,
        "epsilon_budget": 8,
        "delta": 1e-5,
        "noise_multiplier": 1.2,
        "clip_norm": 1,
        "sample_rate": 0.25,
        "steps": 8,
        "rounds": 2,
        "dp_sgd": True,
    }
    assert b["dp_sgd"] is False and b["epsilon"] == "inf" and c["status"] == "declined" and "budget" in c["detail"]
    assert data["secure_aggregation"] is True and data["rounds"] == 2
    assert data["central_dp"]["epsilon"] == pytest.approx(dp.epsilon()) and data["central_dp"]["clip_norm"] == 0.5
    md = (tmp_path / "privacy.md").read_text()
    assert "| site_a | ok | True | 2.5 | 8 |" in md and "Flower SecAgg+" in md and "privacy unit" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["privacy.json", "privacy.md"]  # no temporary left
    PrivacyReport(tmp_path, secure_aggregation=True).update(2, results[:1], None)  # a resumed run keeps site_c
    assert set(json.loads((tmp_path / "privacy.json").read_text())["sites"]) == {"site_a", "site_b", "site_c"}


def test_the_unmasked_secagg_mean_feeds_the_round_accumulator() -> None:
    g = torch.Generator().manual_seed(8)
    current = _sets(g)
    ok = [
        SiteResult(1, "ok", "a", update=SiteUpdate("a", 10, {}, {})),
        SiteResult(2, "ok", "b", update=SiteUpdate("b", 6, {}, {})),
        SiteResult(3, "failed", "c"),
    ]
    mean = {k: v.double() * 1e-3 for k, v in _sets(g).items()}
    plain = RunningMean()  # sample-weighted FedAvg: the new weights are global + the unmasked weighted mean delta
    add_secure_sum(plain, SecureRound(ok, mean, sites=2, weight_sum=16.0), current)
    for k in current:
        torch.testing.assert_close(plain.result()[k], (current[k].double() + mean[k]).float())
    assert plain.total == 16
    dp = ClippedSum(current, 1.0)  # central DP: the sites clipped and weighed 1, the sum is mean x sites
    add_secure_sum(dp, SecureRound(ok, {k: mean[k] for k in ("encoder", "predictor")}, sites=2), current)
    assert dp.count == 2 and dp.norms == []
    torch.testing.assert_close(dp.sums["encoder"], mean["encoder"] * 2)


def test_a_resumed_coordinator_keeps_the_central_accountant(tmp_path: Path) -> None:
    """The checkpoint carries central DP's accountant: a run resumed from it (a coordinator restart) goes
    on from the same epsilon; its privacy report keeps the sites."""
    from server.pretraining import CHECKPOINT, FederatedRun  # noqa: PLC0415

    grads = tmp_path / "gradients.npy"
    save_gradients(grads, np.random.default_rng(0).standard_normal((40, 30)).astype(np.float32))
    cfg = FederationConfig(
        n_rois=40,
        n_frames=64,
        gradients=str(grads),
        out_dir=str(tmp_path / "runs"),
        central_dp=True,
        central_dp_noise_multiplier=0.9,
        fraction_sites=0.5,
    )
    run = FederatedRun.create(cfg)
    assert run.privacy is not None and run.privacy.central is not None
    for rnd in range(2):  # two rounds' releases (2 of 4 sites), as run_round makes them
        run.sets = run.privacy.central.release(run.privacy.central.new_sum(run.sets), run.sets, 2, 4, [0.99])
        run.privacy.after_round(rnd, [SiteResult(7, "ok", "site_a", update=SiteUpdate("site_a", 5, {}, {}))])
        run._save(rnd + 1)
    eps = run.privacy.central.epsilon()
    resumed = FederatedRun.create(dataclasses.replace(cfg, resume_dir=str(run.run_dir)))
    assert resumed.start_round == 2 and (resumed.run_dir / CHECKPOINT).exists()
    assert resumed.privacy is not None and resumed.privacy.central is not None
    assert resumed.privacy.central.epsilon() == eps > 0 and len(resumed.privacy.central.rounds) == 2
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=0.5, noise_multiplier=0.9, steps=2, orders=orders)
    assert eps == pytest.approx(get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0], rel=1e-9)
    assert set(resumed.privacy.report.sites) == {"site_a"}
