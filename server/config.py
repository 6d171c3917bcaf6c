"""The federation's run-wide settings: Flower's run config (`[tool.flwr.app.config]`) as a frozen dataclass.

The defaults below are the only copy: pyproject.toml's `[tool.flwr.app.config]`, the `brainjepa-server`
options and the table in docs/federation.md are checked against them by tests. Those that are a
pretraining or server-optimiser setting as well (model-size, lr, seed, server-lr, server-momentum) are
taken from those dataclasses' defaults; n-rois, n-frames and batch-size are the run's own (a CPU demo). The server is the single
source of truth for training: it turns these settings into a `PretrainConfig` (model, mask, optimiser)
and sends that to every site with each round (`brainjepa.federation.contract`), with checksums the site
verifies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from brainjepa.config import (
    ModelConfig,
    ModelSize,
    OptimConfig,
    PretrainConfig,
    TrainConfig,
    WireDtype,
    load_pretrain_config,
)
from brainjepa.downstream.config import DownstreamTask
from brainjepa.errors import ConfigError, Origin
from brainjepa.schema import check_choices, from_mapping, read_yaml_mapping

RUN_CONFIG = Origin("run config")
# fedavg (x <- mean), fedavgm (server momentum), fedadam or fedyogi (Reddi et al. 2021, FedOpt): a server step
ServerMethod = Literal["fedavg", "fedavgm", "fedadam", "fedyogi"]
# median / trimmed-mean: coordinate-wise robust aggregation of the sites' weights (Flower's FedMedian /
# FedTrimmedAvg logic); they hold every accepted reply of a round at once (sites x parameters x 4 bytes).
RobustMethod = Literal["median", "trimmed-mean"]
ROBUST_METHODS: tuple[str, ...] = get_args(RobustMethod)
Strategy = Literal[ServerMethod, RobustMethod]
# pretrain: federated Brain-JEPA pretraining; finetune / probe: a downstream task on a pretrained backbone
# (`checkpoint` + `downstream-config`), trained federated, selected on validation, scored on test.
RunTask = Literal["pretrain", "finetune", "probe"]
# Pretraining's robust scaling: each site's own statistics, or one federation-wide set combined from the
# sites' quantile sketches (a `scaling-stats` round before the first pretraining round).
ScalingScope = Literal["site", "federation"]


@dataclass(frozen=True)
class ServerOptConfig:
    """`fedavg` (x <- mean), `fedavgm` (server momentum), `fedadam` or `fedyogi` (Reddi et al. 2021, FedOpt)."""

    method: ServerMethod = "fedavg"
    lr: float = 1.0  # server learning rate (eta); fedavg ignores it
    momentum: float = 0.9  # fedavgm
    beta1: float = 0.9  # fedadam, fedyogi
    beta2: float = 0.99
    tau: float = 1e-3  # fedadam / fedyogi adaptivity (epsilon)

    def __post_init__(self) -> None:
        check_choices(self, "server optimizer")


@dataclass(frozen=True)
class FederationConfig:
    num_rounds: int = 3
    local_steps: int = 4  # K optimizer steps per site per round
    min_sites: int = 2  # fewer valid updates than this: the round fails (the run stops, resumable)
    fraction_sites: float = 1.0  # share of connected sites sampled each round (at least min_sites)
    wait_for_sites_s: float = 120.0  # how long a round waits for min_sites to be connected
    round_timeout_s: float = 600.0  # a site that has not replied by then is dropped from the round
    strategy: Strategy = "fedavg"
    server_lr: float = ServerOptConfig.lr
    server_momentum: float = ServerOptConfig.momentum
    # float16: half-precision transfer, uplink as deltas; int8: blockwise int8 deltas both ways, error
    # feedback at the site (pretraining only; not with secure-aggregation, which quantises on its own)
    wire_dtype: WireDtype = "float32"
    seed: int = TrainConfig.seed
    # Optional pretraining YAML (model / mask / optim / data sections). It decides the model and the LR:
    # model-size, n-rois, n-frames and lr must then stay at their defaults (`PRETRAIN_CONFIG_DECIDES`).
    pretrain_config: str = ""
    model_size: ModelSize = ModelConfig.size
    n_rois: int = 100  # the run's own default (a CPU demo), not model.n_rois'
    n_frames: int = 96  # the run's own default (a CPU demo), not model.n_frames'
    lr: float = OptimConfig.lr
    batch_size: int = 8  # each site's local batch size (train.batch_size); the run's own default, a CPU demo's
    gradients: str = ""  # the federation's gradient file (.npy / .csv, R x k)
    out_dir: str = "runs/federated"
    resume_dir: str = ""  # continue this run folder from its last completed round
    sites_dir: str = ""  # simulation: folder of site folders (partition-id -> the sorted site YAMLs)
    save_updates: bool = False  # keep every site's decoded update per round (tests, audits)
    scaling_scope: ScalingScope = "site"  # pretraining: each site's own scaling statistics, or the federation's
    task: RunTask = "pretrain"
    checkpoint: str = ""  # finetune / probe: the pretraining checkpoint (its target encoder is the backbone)
    downstream_config: str = ""  # finetune / probe: a YAML with `task:` (TaskSpec) and `recipe:` (DownstreamConfig)
    # Bounded updates and site identity. site-registry: the JSON `brainjepa-server start --sites-file`
    # writes (node id -> registered site name, key fingerprint, max samples); a reply's site is its node's.
    site_registry: str = ""
    max_update_ratio: float = 0.5  # per trained set: ||site - global|| <= ratio x ||global|| (0: no bound)
    # every set: ||site|| <= (1 + max-norm-growth) x the global norm norm-window rounds ago (0: no bound)
    max_norm_growth: float = 0.25
    norm_window: int = 10
    quarantine_rounds: int = 0  # a rejected site sits out this many rounds (0: the rest of the run)
    max_site_samples: int = 0  # a site claiming more num-examples is rejected (0: only the registry's caps)
    trim_fraction: float = 0.2  # trimmed-mean: share of the sites cut at each end, per coordinate
    keep_checkpoints: int = 3  # round-NNN.pt of the last N rounds are kept next to checkpoint.pt
    resume_round: int = 0  # with resume-dir: continue after this round (its round-NNN.pt); 0: the last one
    # Central DP and secure aggregation (docs/privacy.md). central-dp: each site's delta (encoder +
    # predictor) clipped to central-dp-clip-norm, the sum noised (std noise-multiplier x clip-norm) and
    # divided by the sites sampled; epsilon at central-dp-delta by Opacus' RDP accountant (unit: a site).
    central_dp: bool = False
    central_dp_noise_multiplier: float = 1.0
    central_dp_clip_norm: float = 1.0
    central_dp_delta: float = 1e-5
    # secure-aggregation: pretraining rounds through Flower's SecAgg+ (the server sees only the sum). A site's
    # weighted delta value must lie in +-clip-range (2**22 levels); its weight (num-examples) <= max-weight.
    secure_aggregation: bool = False
    secure_aggregation_clip_range: float = 0.1
    secure_aggregation_max_weight: float = 256.0  # a power of two keeps the weights exact

    def __post_init__(self) -> None:
        check_choices(self, RUN_CONFIG)
        self._check_pretrain_config()
        if self.num_rounds < 1 or self.local_steps < 1 or self.min_sites < 1:
            raise ConfigError("run config: 'num-rounds', 'local-steps' and 'min-sites' must be >= 1")
        if not 0.0 < self.fraction_sites <= 1.0:
            raise ConfigError(f"run config 'fraction-sites': expected (0, 1], got {self.fraction_sites}")
        if self.task != "pretrain" and not (self.checkpoint and self.downstream_config):
            raise ConfigError(
                f"run config: task '{self.task}' needs 'checkpoint' (a pretraining checkpoint) and "
                "'downstream-config' (a YAML with task: and recipe: sections)"
            )
        if min(self.max_update_ratio, self.max_site_samples, self.resume_round, self.max_norm_growth) < 0:
            raise ConfigError(
                "run config: 'max-update-ratio', 'max-norm-growth', 'max-site-samples' and 'resume-round' must be >= 0"
            )
        if self.norm_window < 1 or self.quarantine_rounds < 0:
            raise ConfigError(
                f"run config: 'norm-window' must be >= 1 and 'quarantine-rounds' >= 0, got {self.norm_window}, "
                f"{self.quarantine_rounds}"
            )
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"run config 'trim-fraction': expected [0, 0.5), got {self.trim_fraction}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"run config 'keep-checkpoints': expected >= 1, got {self.keep_checkpoints}")
        if self.resume_round and not self.resume_dir:
            raise ConfigError("run config 'resume-round' needs 'resume-dir' (the run folder to continue)")
        self._check_privacy()
        self._check_wire()
        if self.scaling_scope == "federation" and self.task != "pretrain":
            raise ConfigError(
                f"run config 'scaling-scope': 'federation' applies to pretraining, not task "
                f"'{self.task}' (downstream sites scale with their own statistics)"
            )

    def _check_pretrain_config(self) -> None:
        """With `pretrain-config` the file decides the model and the LR: a run-config key it would
        override must stay at its default (a key that is set and never read is an error)."""
        if not self.pretrain_config:
            return
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, section_key in PRETRAIN_CONFIG_DECIDES.items():
            value = getattr(self, name)
            if value != defaults[name]:
                key = run_config_key(name)
                raise ConfigError(
                    f"run config '{key}': set to {value!r} together with 'pretrain-config' (file "
                    f"'{self.pretrain_config}'), whose {section_key} decides it: set {section_key} "
                    f"in that file, or leave '{key}' at its default {defaults[name]!r}"
                )

    def _check_privacy(self) -> None:
        """central-dp / secure-aggregation settings (pretraining runs only)."""
        if (self.central_dp or self.secure_aggregation) and self.task != "pretrain":
            raise ConfigError(
                f"run config: 'central-dp' and 'secure-aggregation' apply to pretraining runs, not task '{self.task}'"
            )
        if self.central_dp and not (
            self.central_dp_noise_multiplier > 0 and self.central_dp_clip_norm > 0 and 0 < self.central_dp_delta < 1
        ):
            raise ConfigError(
                f"run config: central DP needs 'central-dp-noise-multiplier' > 0, 'central-dp-clip-norm' "
                f"> 0 and 'central-dp-delta' in (0, 1), got {self.central_dp_noise_multiplier}, "
                f"{self.central_dp_clip_norm}, {self.central_dp_delta}"
            )
        if (self.central_dp or self.secure_aggregation) and self.strategy in ROBUST_METHODS:
            what = "central-dp" if self.central_dp else "secure-aggregation"
            raise ConfigError(
                f"run config 'strategy': '{self.strategy}' with '{what}' (central DP needs the clipped "
                "sum, secure aggregation hides single updates): use fedavg, fedavgm, fedadam or fedyogi"
            )
        if self.secure_aggregation and self.min_sites < 2:
            raise ConfigError(
                "run config 'secure-aggregation': needs 'min-sites' >= 2 (a sum of one site is that site)"
            )
        if self.secure_aggregation and not (
            self.secure_aggregation_clip_range > 0 and self.secure_aggregation_max_weight >= 1
        ):
            raise ConfigError(
                f"run config: 'secure-aggregation-clip-range' must be > 0 and "
                f"'secure-aggregation-max-weight' >= 1, got {self.secure_aggregation_clip_range}, "
                f"{self.secure_aggregation_max_weight}"
            )

    def _check_wire(self) -> None:
        """int8 transfer: pretraining runs, never through SecAgg+ (which quantises updates on its own)."""
        if self.wire_dtype != "int8":
            return
        if self.secure_aggregation:
            raise ConfigError(
                "run config: 'wire-dtype' = 'int8' with 'secure-aggregation' = true: SecAgg+ quantises the "
                "updates on its own (its masked vectors are not int8 deltas); use wire-dtype float32 or "
                "float16 with secure-aggregation"
            )
        if self.task != "pretrain":
            raise ConfigError(
                f"run config 'wire-dtype': 'int8' applies to pretraining runs, not task '{self.task}' "
                "(downstream runs use float32 or float16)"
            )

    @property
    def total_steps(self) -> int:
        """Planned optimizer steps of the whole run: the schedules span these."""
        return self.num_rounds * self.local_steps

    def server_opt(self) -> ServerOptConfig:
        method = "fedavg" if self.strategy in ROBUST_METHODS else self.strategy  # no server step
        return ServerOptConfig(method=method, lr=self.server_lr, momentum=self.server_momentum)

    def pretrain(self, base_dir: Path | None = None) -> PretrainConfig:
        """Model / mask / optimiser settings every site trains with (train.steps = the run's total)."""
        if self.pretrain_config:
            path = Path(self.pretrain_config)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            cfg = load_pretrain_config(path)
        else:
            cfg = PretrainConfig(model=ModelConfig(size=self.model_size, n_rois=self.n_rois, n_frames=self.n_frames))
            cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=self.lr))
            if self.scaling_scope == "federation":  # the federation's statistics are the reference's robust kind
                cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, scaling="robust"))
        train = TrainConfig(steps=self.total_steps, batch_size=self.batch_size, seed=self.seed, device="cpu")
        return dataclasses.replace(cfg, train=train)


# Run-config keys that a `pretrain-config` file decides instead (FederationConfig field -> the file's key).
PRETRAIN_CONFIG_DECIDES = {
    "model_size": "model.size",
    "n_rois": "model.n_rois",
    "n_frames": "model.n_frames",
    "lr": "optim.lr",
}


def run_config_key(name: str) -> str:
    """A FederationConfig field as Flower's run config spells it (`num_rounds` -> `num-rounds`)."""
    return name.replace("_", "-")


def from_run_config(run_config: Mapping[str, object]) -> FederationConfig:
    """Flower run config (kebab-case keys) -> FederationConfig, through the one strict loader: unknown keys,
    wrong types and choices outside the allowed ones are errors naming the key."""
    return from_mapping(FederationConfig, dict(run_config), RUN_CONFIG, spell=run_config_key)


def to_run_config(cfg: FederationConfig) -> dict[str, object]:
    """The inverse of `from_run_config` (kebab-case keys), e.g. for `--run-config` or checkpoints."""
    return {run_config_key(k): v for k, v in dataclasses.asdict(cfg).items()}


def load_downstream_task(path: str | Path, defaults: Mapping[str, object]) -> DownstreamTask:
    """The run's downstream YAML: `task:` (TaskSpec), `recipe:` (DownstreamConfig) and optionally
    `model_tr` / `scaling`, which default to `defaults` (the pretraining run's, from its checkpoint)."""
    raw = read_yaml_mapping(path, "downstream config (run config 'downstream-config')")
    return from_mapping(DownstreamTask, {**defaults, **raw}, path)
