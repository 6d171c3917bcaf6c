"""A site's local work over several processes (`brainjepa.distributed`): 2 gloo processes on this CPU
against one process with the same global batches and draws.

- equivalence: `brainjepa pretrain --devices 2` (an uneven split: batch 5 = 2 + 3 rows); one launch of 2
  ranks runs a site's fine-tuning round (stochastic depth on), then a site's DP-SGD pretraining round and DP-SGD
  fine-tuning round (fixed seeds, so that the noise and the Poisson draws can be compared; the noise
  calibrated to the budget); the weights equal one process's to float tolerance, and the DP rounds'
  epsilon is the one-process rounds'.
- faults: a rank that dies, one that hangs, one that refuses; each launch ends with a clear error, every
  rank's process is gone, and the next launch works; ranks whose launcher is killed exit by themselves.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import distributed_workers as workers
import pytest
import torch
import yaml as yaml_text
from typer.testing import CliRunner

from brainjepa.checkpoint import load_checkpoint
from brainjepa.cli import app
from brainjepa.config import (
    DataConfig,
    DistributedConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    PretrainConfig,
    SiteRuntime,
    TrainConfig,
    to_dict,
)
from brainjepa.demo import prepare_federation
from brainjepa.distributed import DistributedError, RankGroup, launch, parse_devices, rank_devices
from brainjepa.downstream.config import DownstreamConfig, DownstreamTask, TaskSpec
from brainjepa.downstream.fit import state_vector
from brainjepa.downstream.model import Backbone, DownstreamModel
from brainjepa.errors import ConfigError, DataError
from brainjepa.federation.contract import MODEL_SET, Metric, RoundSpec
from brainjepa.gradients import gradient_checksum, load_gradients
from brainjepa.jepa import JEPAModels
from brainjepa.pretrain import pretrain
from brainjepa.schema import from_mapping
from brainjepa.vit import Encoder
from brainjepa.weights import WEIGHT_SETS, flat_parameters, model_checksum
from client.downstream import DownstreamSite
from client.training import SiteRound, resolve_site

MODEL = ModelConfig(size="tiny", n_rois=20, n_frames=32, patch_size=16, gradient_components=4)
STEPS = 3
SEEDS = (1234, 5678)  # DP sampling / noise seeds, the same in both runs (a site draws secret ones)


@dataclasses.dataclass(frozen=True)
class Job:
    """What both runs compute: a pretraining run, a fine-tuning round, a DP pretraining round."""

    pretrain: PretrainConfig
    finetune: tuple[RoundSpec, Path, Path, torch.Tensor]  # spec, site YAML, gradient file, global weights
    private: tuple[RoundSpec, Path, Path, dict[str, torch.Tensor]]  # spec, DP site YAML, gradients, sets


def work(group: RankGroup | None, job: Job) -> dict:
    """The round computations in this process (group None) or as one rank of a group; in this process
    also the pretraining run (on 2 processes it runs through the command line: the test fixture)."""
    models = {}
    if group is None:
        models = load_checkpoint(pretrain(job.pretrain, progress=False).checkpoint)["models"]
    spec, yaml, grads, vec = job.finetune
    site, runtime = resolve_site(yaml)
    ft_sets, ft_metrics = DownstreamSite(spec, site, runtime, grads, group).train({MODEL_SET: vec.clone()})
    spec, yaml, grads, sets = job.private
    site, runtime = resolve_site(yaml)
    received = {k: v.clone() for k, v in sets.items()}
    dp_sets, dp_metrics, moments = SiteRound(spec, site, runtime, grads, received, None, seeds=SEEDS).train(group)
    ft_spec, _, _, vec = job.finetune
    dp_ft = DownstreamSite(ft_spec, site, runtime, grads, group, seeds=SEEDS).train({MODEL_SET: vec.clone()})
    return {
        "private_finetune": (*dp_ft, vec),
        "pretrain": models,
        "finetune": (ft_sets, ft_metrics, vec),
        "private": (dp_sets, dp_metrics, moments, sets),
    }


def rank_work(group: RankGroup, job: Job) -> dict:
    return work(group, job)


def _pretrain_spec(grads: Path) -> RoundSpec:
    cfg = PretrainConfig(model=MODEL, optim=OptimConfig(lr=1e-3), train=TrainConfig(steps=4 * STEPS, batch_size=4))
    g = load_gradients(grads, 20, 4)
    models = JEPAModels(MODEL, torch.from_numpy(g))
    return RoundSpec(
        task="pretrain",
        round=0,
        num_rounds=4,
        step_start=0,
        local_steps=STEPS,
        wire_dtype="float32",
        model_checksum=model_checksum(MODEL, {n: getattr(models, n) for n in WEIGHT_SETS}),
        gradient_checksum=gradient_checksum(g),
        task_config=cfg,
    )


def _finetune_spec(grads: Path) -> tuple[RoundSpec, torch.Tensor]:
    g = load_gradients(grads, 20, 4)
    torch.manual_seed(0)
    backbone = Backbone(MODEL, g, Encoder(MODEL, torch.from_numpy(g)).state_dict(), "test")
    task = TaskSpec(name="age", column="age", kind="regression")
    recipe = DownstreamConfig(method="finetune", steps=8, batch_size=4, eval_every=4, drop_path=0.3)
    server = DownstreamModel(backbone, task, recipe)
    spec = RoundSpec(
        task="finetune",
        round=0,
        num_rounds=2,
        step_start=0,
        local_steps=STEPS,
        wire_dtype="float32",  # type: ignore[arg-type]
        model_checksum=model_checksum(MODEL, {MODEL_SET: server}),
        gradient_checksum=gradient_checksum(g),
        task_config=DownstreamTask(task=task, recipe=recipe, model_tr=2.205, scaling="values"),
        model_config=MODEL,
        target_center=30.0,
        target_scale=10.0,
    )
    return spec, state_vector(server)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """(one process, 2 gloo processes): the same job."""
    root = tmp_path_factory.mktemp("distributed")
    demo = prepare_federation(root / "sites", n_sites=1, subjects=10, n_rois=20, n_frames=32, n_components=4)
    yaml, grads = demo.site_yamls[0], demo.gradients
    pretrain_cfg = PretrainConfig(
        model=MODEL,
        data=DataConfig(site=str(yaml), gradients=str(grads)),
        train=TrainConfig(steps=STEPS, batch_size=5, out_dir=str(root / "pretrain"), checkpoint_every=STEPS),
        monitor=MonitorConfig(every=0),
    )
    ft_spec, vec = _finetune_spec(grads)
    torch.manual_seed(0)
    sets = {
        n: flat_parameters(getattr(JEPAModels(MODEL, torch.from_numpy(load_gradients(grads))), n)) for n in WEIGHT_SETS
    }
    single, ranks = {}, {}
    for name, where in (("single", single), ("ranks", ranks)):
        dp_yaml = yaml.with_name(f"dp_{name}.yaml")  # its own ledger: both runs start from an empty one
        dp_yaml.write_text(
            yaml.read_text() + f"privacy: {{enabled: true, target_epsilon: 20.0, max_grad_norm: 0.5, "
            f"ledger: '{root / name}-ledger.json'}}\n"  # noise calibrated to the budget, kept in the ledger
        )
        job = Job(pretrain_cfg, (ft_spec, yaml, grads, vec), (_pretrain_spec(grads), dp_yaml, grads, sets))
        if name == "single":
            where.update(work(None, job))
        else:
            where.update(launch(rank_work, job, DistributedConfig(devices=2, timeout_s=120), "cpu"))
    # `brainjepa pretrain --devices 2` on the same config: 2 gloo processes, rank 0 writes the run folder
    config = root / "pretrain.yaml"
    config.write_text(yaml_text.safe_dump(to_dict(pretrain_cfg)))
    out = root / "pretrain-ranks"
    result = CliRunner().invoke(app, ["pretrain", "-c", str(config), "--out-dir", str(out), "--devices", "2"])
    assert result.exit_code == 0, result.output
    ranks["pretrain"] = load_checkpoint(out / "checkpoint.pt")["models"]
    return single, ranks


def _assert_close(a: torch.Tensor, b: torch.Tensor, what: str, moved_from: torch.Tensor | None = None) -> float:
    """max |a - b| (asserted small), and with `moved_from`, that training moved the weights."""
    worst = float((a.float() - b.float()).abs().max())
    assert worst <= 2e-5, f"{what}: one process and 2 processes differ by up to {worst:.3g}"
    if moved_from is not None:  # the run really trained
        assert float((a.float() - moved_from.float()).abs().max()) > 1e-5, what
    return worst


@pytest.mark.integration  # 2 spawned processes (gloo)
def test_pretraining_on_two_processes_equals_one(runs) -> None:
    """`brainjepa pretrain --devices 2` (batch 5: 2 + 3 rows), 3 steps: the checkpoint's weights (EMA
    target included) equal one process's."""
    single, ranks = runs
    assert single["pretrain"].keys() == ranks["pretrain"].keys()
    worst = max(_assert_close(ranks["pretrain"][key], value, key) for key, value in single["pretrain"].items())
    print(f"pretraining: max |1 process - 2 processes| = {worst:.3g}")
    assert not torch.equal(
        single["pretrain"]["target.blocks.0.mlp.fc1.weight"], single["pretrain"]["encoder.blocks.0.mlp.fc1.weight"]
    )


@pytest.mark.integration
def test_fine_tuning_on_two_processes_equals_one(runs) -> None:
    """A site's fine-tuning round (stochastic depth 0.3: every rank draws the whole batch's masks), 3 steps."""
    single, ranks = runs
    (s_sets, s_metrics, init), (r_sets, r_metrics, _) = single["finetune"], ranks["finetune"]
    worst = _assert_close(r_sets[MODEL_SET], s_sets[MODEL_SET], "fine-tuned weights", moved_from=init)
    print(f"fine-tuning: max |1 process - 2 processes| = {worst:.3g}")
    assert abs(r_metrics[Metric.LOSS] - s_metrics[Metric.LOSS]) < 1e-5
    assert (s_metrics[Metric.PROCESSES], r_metrics[Metric.PROCESSES]) == (1.0, 2.0)


@pytest.mark.integration
def test_dp_sgd_on_two_processes_equals_one_with_the_same_epsilon(runs) -> None:
    """A site's DP-SGD pretraining round, then a DP fine-tuning round, with the same seeds: the same Poisson
    draws split over the ranks, clipped sums added before ONE noise draw: the same weights; one ledger
    (written by rank 0: the calibrated noise, then each round), the same epsilon."""
    single, ranks = runs
    (s_sets, s_metrics, s_moments, init), (r_sets, r_metrics, r_moments, _) = single["private"], ranks["private"]
    worst = max(_assert_close(r_sets[n], s_sets[n], f"DP {n}", moved_from=init[n]) for n in WEIGHT_SETS)
    print(f"DP-SGD: max |1 process - 2 processes| = {worst:.3g}")
    for name, moment in s_moments["moments"].items():  # what the site keeps for its next round
        assert type(r_moments["moments"][name]) is type(moment)
        _assert_close(torch.from_numpy(r_moments["moments"][name]), torch.from_numpy(moment), f"AdamW {name}")
    assert r_metrics[Metric.EPSILON_SPENT] == s_metrics[Metric.EPSILON_SPENT] > 0
    assert r_metrics[Metric.DP_NOISE_MULTIPLIER] == s_metrics[Metric.DP_NOISE_MULTIPLIER] > 0  # calibrated once
    assert r_metrics[Metric.DP_STEPS] == s_metrics[Metric.DP_STEPS] == STEPS
    # then a DP fine-tuning round from the same ledger: the same weights and epsilon again
    (s_sets, s_metrics, init), (r_sets, r_metrics, _) = single["private_finetune"], ranks["private_finetune"]
    worst = _assert_close(r_sets[MODEL_SET], s_sets[MODEL_SET], "DP fine-tuning", moved_from=init)
    print(f"DP-SGD fine-tuning: max |1 process - 2 processes| = {worst:.3g}")
    assert r_metrics[Metric.EPSILON_SPENT] == s_metrics[Metric.EPSILON_SPENT] > 0
    assert r_metrics[Metric.DP_STEPS] == s_metrics[Metric.DP_STEPS] == 2 * STEPS


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.integration  # 4 launches of 2 spawned processes
def test_a_rank_that_dies_hangs_or_refuses_ends_the_round_cleanly(tmp_path: Path) -> None:
    """Each failure is an error naming the ranks and what happened to them; no rank's process is left
    (not even a zombie: all are reaped); the next launch starts clean and works."""
    cfg = DistributedConfig(devices=2, timeout_s=3.0)
    cases = [
        (workers.rank_one_dies, DistributedError, r"rank 1 \(cpu\): died \(exit code 3"),
        (workers.rank_one_hangs, DistributedError, r"rank 0 \(cpu\): failed: .*Timed out.*rank 1 \(cpu\): stopped"),
        (workers.rank_one_refuses, DataError, r"3 ROIs, expected 20"),
    ]
    for fn, error, message in cases:
        folder = tmp_path / fn.__name__
        folder.mkdir()
        with pytest.raises(error, match=message):
            launch(fn, str(folder), cfg, "cpu", passthrough=(DataError,))
        pids = [int(p.read_text()) for p in folder.glob("pid-*")]
        assert len(pids) == 2 and all(_gone(pid) for pid in pids), fn.__name__
    (tmp_path / "after").mkdir()
    assert launch(workers.total, str(tmp_path / "after"), cfg, "cpu") == 3.0


LAUNCHER = """
import sys
sys.path.insert(0, sys.argv[2])
import distributed_workers
from brainjepa.config import DistributedConfig
from brainjepa.distributed import launch
if __name__ == "__main__":
    launch(distributed_workers.rank_one_hangs, sys.argv[1], DistributedConfig(devices=2, timeout_s=300), "cpu")
"""


@pytest.mark.integration  # a launcher process and its 2 ranks
def test_ranks_exit_when_their_launcher_is_killed(tmp_path: Path) -> None:
    """The process that launched the ranks (a site's ClientApp process) is killed mid-round: its ranks,
    one of them stuck, end by themselves (they watch their parent) instead of living on as orphans."""
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), str(tmp_path), str(Path(__file__).parent)]
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("pid-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in tmp_path.glob("pid-*")]
        assert len(pids) == 2 and not any(_gone(pid) for pid in pids)
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(pid) for pid in pids), "a rank outlived its launcher"


def test_devices_parse_and_refuse_clearly() -> None:
    """Site YAML `distributed.devices`: a count or CUDA ids; anything else is an error naming the key."""
    parse = lambda d: from_mapping(SiteRuntime, {"distributed": d}, "site.yaml").distributed  # noqa: E731
    assert parse({"devices": 2}).world == 2 and parse({"devices": [0, 3]}).devices == (0, 3)
    with pytest.raises(ConfigError, match=r"site.yaml', field 'distributed.devices': expected an integer or a list"):
        parse({"devices": "two"})
    with pytest.raises(ConfigError, match="distributed.timeout_s"):
        parse({"timeout_s": 0})
    assert parse_devices("4") == 4 and parse_devices("0,2") == (0, 2) and parse_devices("3,") == (3,)
    with pytest.raises(ConfigError, match="--devices"):
        parse_devices("gpu0")
    assert rank_devices(DistributedConfig(devices=3), "cpu") == ["cpu"] * 3
    with pytest.raises(ConfigError, match=r"distributed.devices: \[0, 1\] names CUDA devices"):
        rank_devices(DistributedConfig(devices=(0, 1)), "cpu")
    with pytest.raises(ConfigError, match="distributed.devices"):
        DistributedConfig(devices=0)
    with pytest.raises(ConfigError, match="distinct"):
        DistributedConfig(devices=(1, 1))
    group = RankGroup(1, 2, torch.device("cpu"))
    assert group.rows(5) == slice(2, 5) and group.share(5) == 0.6
