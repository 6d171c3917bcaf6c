"""Frozen dataclass configs and strict YAML loading.

An unknown key, a missing section or a wrong type is a `ConfigError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from brainjepa.errors import ConfigError, where
from brainjepa.schema import check_choices, from_mapping, read_yaml_mapping
from sites.config import SiteConfig, load_site_yaml
from sites.scaling import Scaling
from sites.temporal import DEFAULT_MODEL_TR

ModelSize = Literal["tiny", "small", "base", "large"]
PosEmbed = Literal["gradient", "learned_roi", "sincos_roi"]  # gradient: Brain-JEPA; the others are ablations
# reference: trunc-normal(0.02) patch-embedding weights (the reference; a 16-frame patch then weighs ~1/9 of
# the positional term); unit: std 1/sqrt(patch_size), a unit-variance patch gives a unit-variance embedding.
PatchInit = Literal["reference", "unit"]
Loss = Literal["smooth_l1", "l2"]
# The regression targets: layer_norm, the EMA target's tokens LayerNorm-ed (no affine; the reference);
# centered: then less each token position's mean over the (micro-)batch, as DINO centres its teacher (what
# every scan has at a position, which the token positions alone predict, is removed; what scans differ in stays).
TargetNorm = Literal["layer_norm", "centered"]
Precision = Literal["auto", "bf16", "fp32"]  # auto: bf16 autocast on CUDA, fp32 on CPU
# how weights travel in a federated round (float16: deltas uplink; int8: blockwise int8 deltas both ways with
# error feedback at the site, brainjepa.federation.compression)
WireDtype = Literal["float32", "float16", "int8"]
AttentionBackend = Literal["auto", "cudnn", "flash", "efficient", "math", "default"]
MaskMode = Literal["spatiotemporal", "random"]  # spatiotemporal: Brain-JEPA; random: the ablation


@dataclass(frozen=True)
class ModelConfig:
    """Encoder / predictor shapes. `n_rois` x `n_frames` is one sample; `patch_size` frames per token."""

    size: ModelSize = "tiny"  # sets the encoder width/depth/heads
    n_rois: int = 450
    n_frames: int = 160
    patch_size: int = 16
    gradient_components: int = 30
    embed_dim: int = 0  # 0 = from `size`
    depth: int = 0
    num_heads: int = 0
    pred_dim: int = 0  # 0 = from `size` (384 wide, 6 layers, the encoder's head count for small, base, large)
    pred_depth: int = 0
    pred_heads: int = 0
    mlp_ratio: float = 4.0
    pos_embed: PosEmbed = "gradient"
    patch_init: PatchInit = "unit"  # the data term as large as the positions at init; reference: 0.02 (docs/model.md)

    def __post_init__(self) -> None:
        check_choices(self, "model")
        d, depth, heads = ENCODER_SIZES[self.size]
        object.__setattr__(self, "embed_dim", self.embed_dim or d)
        object.__setattr__(self, "depth", self.depth or depth)
        object.__setattr__(self, "num_heads", self.num_heads or heads)
        pd, pdepth, pheads = PREDICTOR_SIZES[self.size]
        object.__setattr__(self, "pred_dim", self.pred_dim or pd)
        object.__setattr__(self, "pred_depth", self.pred_depth or pdepth)
        object.__setattr__(self, "pred_heads", self.pred_heads or pheads)
        if self.n_frames % self.patch_size:
            raise ConfigError(
                f"model.n_frames: must be divisible by model.patch_size={self.patch_size}, got {self.n_frames}"
            )
        for name, dim, heads in (("", self.embed_dim, self.num_heads), ("pred_", self.pred_dim, self.pred_heads)):
            if dim % heads or dim % 4:
                raise ConfigError(f"model.{name}dim={dim}: must be divisible by 4 and by model.{name}heads={heads}")

    @property
    def n_time_patches(self) -> int:
        return self.n_frames // self.patch_size

    @property
    def n_tokens(self) -> int:
        return self.n_rois * self.n_time_patches


# size -> (embed_dim, depth, heads). tiny is for tests and CPU demos.
ENCODER_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 4, 4),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
# size -> (pred_dim, pred_depth, pred_heads): the reference predictor for real sizes. Its head count
# is the ENCODER's (ref `init_model` passes `num_heads=encoder.num_heads`): 6 / 12 / 16. Same weight
# shapes for any head count, so a wrong one would load silently and compute another function.
PREDICTOR_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 2, 4),
    "small": (384, 6, 6),
    "base": (384, 6, 12),
    "large": (384, 6, 16),
}


@dataclass(frozen=True)
class MaskConfig:
    """Spatiotemporal masking (fractions of ROIs / time patches), as in the reference config.

    `mode: random` (ablation) draws the same per-batch token counts, then places the context and the
    targets uniformly at random over the whole R x W grid (brainjepa.masks.sample_random_masks)."""

    obs_roi_scale: tuple[float, float] = (0.84, 1.0)  # observed share of the non-Cross-ROI ROIs
    obs_time_scale: tuple[float, float] = (0.84, 1.0)  # observation window, share of W
    alpha_roi_scale: tuple[float, float] = (0.45, 0.6)  # Cross-ROI target: share of ROIs
    alpha_time_scale: tuple[float, float] = (0.2, 0.6)  # Cross-ROI target: share of W (contiguous)
    edge_roi_scale: tuple[float, float] = (0.15, 0.3)  # Cross-Time / Double-Cross: share of ROI pools
    edge_time_scale: tuple[float, float] = (0.0, 0.4)  # columns per side, share of W
    edge_width: float = 0.3  # the left/right edge zones, share of W (ref: 3 of 10)
    reference_truncation: bool = False  # reproduce the ref's per-sample sampling + batch-min truncation
    mode: MaskMode = "spatiotemporal"  # random: the same token counts, placed uniformly over the R x W grid

    def __post_init__(self) -> None:
        check_choices(self, "mask")
        if self.mode == "random" and self.reference_truncation:
            raise ConfigError("mask.reference_truncation: applies to mode 'spatiotemporal' only, not 'random'")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + schedules over the planned optimizer steps of the whole run."""

    lr: float = 1e-3
    start_lr: float = 5e-5
    final_lr: float = 1e-6
    warmup_fraction: float = 40 / 300  # ref: 40 of 300 epochs
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    ema: tuple[float, float] = (0.996, 1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    loss: Loss = "smooth_l1"
    target_norm: TargetNorm = "layer_norm"  # centered: targets less their per-position batch mean (docs/model.md)
    accumulation_steps: int = 1

    def __post_init__(self) -> None:
        check_choices(self, "optim")
        if self.accumulation_steps < 1:
            raise ConfigError(f"optim.accumulation_steps: expected >= 1, got {self.accumulation_steps}")


@dataclass(frozen=True)
class DataConfig:
    """Where the pretraining cohort lives: a site YAML (`site`) or a folder of ROI `.npy` files."""

    site: str = ""  # path of a site YAML (sites.config schema)
    sites: tuple[str, ...] = ()  # or: several site YAMLs, pooled (each scaled with its own statistics)
    roi_dir: str = ""  # or: a folder of per-subject (R, L) .npy files, already at the model TR
    gradients: str = ""  # gradient file (.npy/.csv, R x k); empty = computed from the cohort's FC
    model_tr: float = DEFAULT_MODEL_TR  # seconds: every site's series is resampled to it (site input only)
    scaling: Scaling = (
        "centered"  # each scan's ROI means removed, one per-ROI scale; robust: the reference's (docs/data.md)
    )

    def __post_init__(self) -> None:
        check_choices(self, "data")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200  # planned optimizer steps (the schedules span these)
    batch_size: int = 16
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out_dir: str = "runs/pretrain"
    checkpoint_every: int = 50
    keep_every: int = 0  # also keep checkpoint_STEP.pt every this many steps (features along a run); 0 = latest only
    log_every: int = 1
    activation_checkpointing: bool = False  # recompute block activations in backward (less memory)
    precision: Precision = "auto"

    def __post_init__(self) -> None:
        check_choices(self, "train")
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: expected >= 1, got {getattr(self, name)}")
        if self.keep_every < 0:
            raise ConfigError(
                f"train.keep_every: expected >= 0 (0 = keep only the latest checkpoint), got {self.keep_every}"
            )


ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)


@dataclass(frozen=True)
class PerfConfig:
    """Speed switches. None changes the model or the maths beyond float rounding (docs/performance.md);
    all off is the plain eager path that Opacus hooks and debuggers see."""

    compile: bool = False  # torch.compile every transformer block (one graph per width, dynamic token count)
    attention: AttentionBackend = "auto"  # SDPA backend order on CUDA (auto: cuDNN first on Hopper)
    cuda_graphs: bool = False  # CUDA + compile only: replay the target encoder's static-shape forward as a CUDA graph
    prefetch: int = 2  # steps of batches (windows + masks) prepared ahead in a background thread; 0 = inline
    selective_checkpointing: bool = (
        False  # backward keeps matmul/attention outputs, recomputes pointwise ops (less memory)
    )
    recompute_fraction: float = (
        0.0  # share of each trained network's blocks recomputed whole in backward (1 = train.activation_checkpointing)
    )

    def __post_init__(self) -> None:
        check_choices(self, "perf")
        if self.cuda_graphs and not self.compile:
            raise ConfigError("perf.cuda_graphs: needs perf.compile: true (the graphs are captured by torch.compile)")
        if self.prefetch < 0:
            raise ConfigError(f"perf.prefetch: expected >= 0, got {self.prefetch}")
        if not 0.0 <= self.recompute_fraction <= 1.0:
            raise ConfigError(f"perf.recompute_fraction: expected a share from 0 to 1, got {self.recompute_fraction}")


@dataclass(frozen=True)
class MonitorConfig:
    """Collapse monitor (`brainjepa.monitor`): spread and effective rank of the EMA target's token
    features on a fixed probe batch, every `every` optimizer steps (federated: after every round)."""

    every: int = 20  # optimizer steps between measurements; 0 = off
    probe_scans: int = 8  # scans in the fixed probe batch (one window each)
    rank_floor: float = 0.1  # warn below this share of embed_dim as effective rank (6.4 of 64 for tiny)
    spread_floor: float = 0.05  # warn below this mean per-dimension std of the token features
    drop: float = 0.5  # warn when rank or spread fall below (1 - drop) x their first measured value
    position_ceiling: float = 0.5  # warn when position alone explains more of the targets' variance
    context_gain_floor: float = 1.05  # warn when another scan's context raises the loss by less than this factor
    # raise `Explosion` when the target's weight norm, feature spread or per-scan spread grows by more than this
    # factor (or its effective rank changes by it) since the previous measurement; 0 = off
    explode: float = 10.0

    def __post_init__(self) -> None:
        if self.every < 0 or self.probe_scans < 2:
            raise ConfigError(
                f"monitor: expected every >= 0 and probe_scans >= 2, got every={self.every}, "
                f"probe_scans={self.probe_scans}"
            )
        if not 0.0 < self.drop < 1.0:
            raise ConfigError(f"monitor.drop: expected a share in (0, 1), got {self.drop}")
        if self.explode != 0.0 and self.explode <= 1.0:
            raise ConfigError(f"monitor.explode: expected a factor > 1 (or 0: off), got {self.explode}")


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


PrivacyAccountant = Literal["rdp", "prv"]


@dataclass(frozen=True)
class PrivacyConfig:
    """A site's DP-SGD budget (the `privacy` section of a site YAML; docs/privacy.md). Only the site sets
    it: nothing in a round record can change it. The unit of privacy is the subject."""

    enabled: bool = False
    target_epsilon: float | None = None  # the site's budget over everything its ledger records
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # C: each subject's per-step gradient is clipped to this L2 norm
    noise_multiplier: float | None = None  # sigma; null = calibrated to the budget over the run's planned steps
    accountant: PrivacyAccountant = "rdp"  # Opacus' RDP or PRV accountant
    ledger: str = ""  # the accountant's file on the site's disk; "" = <site YAML folder>/privacy/<site>-ledger.json
    clip_chunk: int = 0  # samples whose per-sample gradients exist at once (memory); 0 = the whole batch

    def __post_init__(self) -> None:
        check_choices(self, "privacy")
        if not self.enabled:
            return
        if self.target_epsilon is None or not self.target_epsilon > 0:
            raise ConfigError(
                f"privacy.target_epsilon: expected a positive number when privacy.enabled is true, "
                f"got {self.target_epsilon}"
            )
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"privacy.delta: expected a number in (0, 1), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"privacy.max_grad_norm: expected a positive number, got {self.max_grad_norm}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(
                f"privacy.noise_multiplier: expected a positive number or null (calibrate to the "
                f"budget), got {self.noise_multiplier}"
            )
        if self.clip_chunk < 0:
            raise ConfigError(f"privacy.clip_chunk: expected >= 0 (0 = the whole batch), got {self.clip_chunk}")


@dataclass(frozen=True)
class DistributedConfig:
    """A site's local work over several processes (`brainjepa.distributed`; the `distributed` section of a
    site YAML, `brainjepa pretrain --devices`): one process per GPU, or gloo processes on a CPU."""

    devices: int | tuple[int, ...] = 1  # a count (CUDA: cuda:0..N-1; CPU: N processes) or CUDA device ids
    timeout_s: float = 600.0  # a rank waiting this long for the others (dead or hung) ends the round
    port: int = 0  # the ranks' loopback rendezvous port; 0 = a free one, chosen each round

    def __post_init__(self) -> None:
        d = self.devices
        if isinstance(d, int) and d < 1:
            raise ConfigError(f"distributed.devices: expected a count >= 1 or a list of CUDA device ids, got {d}")
        if isinstance(d, tuple) and (not d or min(d) < 0 or len(set(d)) != len(d)):
            raise ConfigError(f"distributed.devices: expected distinct CUDA device ids >= 0, got {list(d)}")
        if not self.timeout_s > 0:
            raise ConfigError(f"distributed.timeout_s: expected a positive number of seconds, got {self.timeout_s}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"distributed.port: expected 0 (a free port) or a TCP port up to 65535, got {self.port}")

    @property
    def world(self) -> int:
        """The number of processes (ranks)."""
        return self.devices if isinstance(self.devices, int) else len(self.devices)


@dataclass(frozen=True)
class SiteRuntime:
    """How a site trains, from the top-level keys of its YAML that are not about its data
    (`sites.config.RUNTIME_KEYS`): the machine's device(s) and speed switches, and its privacy budget.
    The batch size is the federation's (the run config's `batch-size`), not the site's."""

    device: str = TrainConfig.device  # auto | cpu | cuda | cuda:N
    perf: PerfConfig = field(default_factory=PerfConfig)  # this machine's speed switches (brainjepa.fastpath)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # several GPUs / CPU processes


def load_site(path: str | Path) -> tuple[SiteConfig, SiteRuntime]:
    """Read a site YAML once: its data description (`sites`) and how it trains (`SiteRuntime`).
    Errors name the file and the key."""
    site, runtime = load_site_yaml(path)
    return site, from_mapping(SiteRuntime, runtime, site.source)


def load_pretrain_config(path: str | Path, overrides: dict | None = None) -> PretrainConfig:
    """Read a pretraining YAML file (sections model, mask, optim, data, train, perf).

    Relative paths inside the `data` section are resolved against the YAML file's folder.
    """
    path = Path(path)
    raw = read_yaml_mapping(path, "pretraining config")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})[key] = value
    data = raw.get("data") or {}
    for key in ("site", "roi_dir", "gradients"):
        if isinstance(data.get(key), str) and data[key] and not Path(data[key]).is_absolute():
            data[key] = str((path.parent / data[key]).resolve())
    if isinstance(data.get("sites"), list):
        data["sites"] = [str((path.parent / p).resolve()) if isinstance(p, str) else p for p in data["sites"]]
    train = raw.get("train") or {}
    if isinstance(train, dict) and isinstance(train.get("out_dir"), str) and not Path(train["out_dir"]).is_absolute():
        train["out_dir"] = str((path.parent / train["out_dir"]).resolve())
    try:
        return from_mapping(PretrainConfig, raw, path)
    except ConfigError as e:
        if str(path) in str(e):
            raise
        raise ConfigError(f"{where(path)}: {e}") from e


def to_dict(cfg: Any) -> dict:
    """A plain, YAML/JSON-friendly dict of a (nested) config dataclass."""
    return dataclasses.asdict(cfg)
