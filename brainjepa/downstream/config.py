"""What a downstream run predicts and how it trains: frozen configs read by the one strict loader.

`TaskSpec` names a `participants.tsv` column and how to read it (classification with an explicit class
list: the class filter and the label order every site shares; or regression). `DownstreamConfig` is
the training recipe of one method (fine-tuning, linear probing, the same ViT from scratch), defaults
from the reference's downstream recipe (docs/downstream.md, docs/model.md), with layer-wise LR decay and
drop-path that do take effect (the reference configures both and uses neither). `BaselineConfig` is how
the non-neural baselines clean and read a scan (band-pass, spectrum bands, strength grids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from brainjepa.errors import ConfigError
from brainjepa.schema import check_choices
from sites.scaling import Scaling
from sites.temporal import DEFAULT_MODEL_TR

TaskKind = Literal["classification", "regression"]
# finetune: pretrained backbone + head, all trained; probe: frozen pretrained backbone, BatchNorm + Linear;
# scratch: the same ViT and head from random weights (no pretraining); random_probe: a probe on a frozen
# untrained backbone (what pretraining must beat).
Method = Literal["finetune", "probe", "scratch", "random_probe"]
NEURAL_METHODS: tuple[str, ...] = get_args(Method)
# The non-neural baselines (brainjepa.downstream.baselines): per-ROI band power, cleaned / tangent / raw FC.
Baseline = Literal["roi_spectrum", "fc", "fc_tangent", "fc_raw"]
BASELINES: tuple[str, ...] = get_args(Baseline)
# mean: the reference's mean over all ROI x time tokens (D features); roi_std: per ROI the mean and the
# std over time of its tokens (R x 2D features: keeps the ROI axis and each ROI's spread over time);
# roi_fc: second-order pooling, the connectivity of the learned features: per embedding dimension the
# correlation of two ROIs' tokens over the window's time patches, averaged over dimensions, Fisher z
# (R(R-1)/2 features, what FC reads, from the encoder's tokens instead of the raw series);
# roi_std_fc: both, side by side (R x 2D + R(R-1)/2 features; after the head's normalisation each of the two
# blocks is weighted to the same total variance, so the 2D-per-ROI block does not drown the connectivity).
Pool = Literal["mean", "roi_std", "roi_fc", "roi_std_fc"]
# lbfgs: the probe's head solved on the frozen features (scikit-learn's L2 logistic / ridge regression,
# its strength chosen by `select`); sgd: trained like the other methods (AdamW `steps` at `probe_lr`,
# the reference's way; what a federated probe does, FedAvg having no closed form).
ProbeSolver = Literal["lbfgs", "sgd"]
# How a solved probe and the FC baseline choose their regularisation strength: cv, 5-fold cross-validation
# over the training scans (brainjepa.downstream.selection); validation: on the validation split alone.
Select = Literal["cv", "validation"]
# What `brainjepa evaluate` scores: the test splits (once, recorded in the scoring ledger), or the fine-tuning
# sites' validation splits (`brainjepa.downstream.validation_scoring`: no test split read; what designs are
# chosen with).
ScoreOn = Literal["test", "validation"]
# balanced: fine-tuning's cross-entropy weights each class by n / (K x its count) in the training labels it
# sees (scikit-learn's "balanced", as the solved probe and FC use); none: the reference's plain cross-entropy.
ClassWeight = Literal["balanced", "none"]


@dataclass(frozen=True)
class TaskSpec:
    name: str  # how tables call it, e.g. "sex"
    column: str  # the participants.tsv column
    kind: TaskKind = "classification"
    classes: tuple[str, ...] = ()  # classification: the values kept, in label order (e.g. ["0", "1"])

    def __post_init__(self) -> None:
        check_choices(self, f"task '{self.name}'")
        if self.kind == "classification" and len(self.classes) < 2:
            raise ConfigError(
                f"task '{self.name}': classification needs 'classes', the column values to keep "
                f"in label order (at least 2), got {list(self.classes)}"
            )
        if self.kind == "regression" and self.classes:
            raise ConfigError(f"task '{self.name}': 'classes' is for classification, the task is a regression")

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.kind == "classification" else 1


@dataclass(frozen=True)
class DownstreamConfig:
    """One method's training recipe. Steps are optimizer steps over the training scans."""

    method: Method = "finetune"
    steps: int = 200
    batch_size: int = 16
    lr: float = 6.25e-5  # ref fine-tuning LR (AdamW, batch 16); short runs on small data want more
    probe_lr: float = 1e-2  # linear probe (BatchNorm + Linear on frozen features; the ref uses LARS 2.5e-4 x 64/256)
    weight_decay: float = 0.05
    layer_decay: float = 0.75  # LR of block i = lr * layer_decay ** (depth - i); 1.0 = off
    drop_path: float = 0.1  # stochastic depth at the last block (linear from 0 at the first)
    warmup_fraction: float = 0.1
    eval_every: int = 25  # validation (model selection) every this many steps, and at the end
    eval_windows: int = 8  # windows per scan at evaluation (and the solved probe's training), predictions averaged
    seed: int = 0
    pool: Pool = "roi_std"  # per-ROI mean + std over time of the tokens; mean: the reference (all tokens)
    probe_solver: ProbeSolver = "lbfgs"  # probes trained centrally / locally; federated probes always use sgd
    select: Select = "cv"  # the solved probe's and the FC baseline's strength; validation: the earlier rule
    class_weight: ClassWeight = "balanced"  # trained classifiers' loss (federated: each site its own counts)

    def __post_init__(self) -> None:
        check_choices(self, "downstream")
        for name in ("steps", "batch_size", "eval_every", "eval_windows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"downstream.{name}: expected >= 1, got {getattr(self, name)}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"downstream.layer_decay: expected (0, 1], got {self.layer_decay}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"downstream.drop_path: expected [0, 1), got {self.drop_path}")

    @property
    def frozen_backbone(self) -> bool:
        return self.method in ("probe", "random_probe")

    @property
    def pretrained(self) -> bool:
        return self.method in ("finetune", "probe")


@dataclass(frozen=True)
class DownstreamTask:
    """What a site is asked to do in a downstream round: the task, the recipe and the data window
    (the model's window and TR, which come from the pretraining checkpoint)."""

    task: TaskSpec
    recipe: DownstreamConfig = field(default_factory=DownstreamConfig)
    model_tr: float = DEFAULT_MODEL_TR
    scaling: Scaling = "centered"


@dataclass(frozen=True)
class BaselineConfig:
    """How the non-neural baselines (`brainjepa.downstream.baselines`) read a scan.

    detrend: remove each ROI's linear trend (nilearn's cleaning for fc / fc_tangent; Welch segments' linear
    detrend for roi_spectrum). high_pass / low_pass: the band-pass (Hz) of fc / fc_tangent's cleaning;
    None or 0 disables either. bands: roi_spectrum's (low, high) bands in Hz. c_grid / alpha_grid: the
    candidate LogisticRegression C / Ridge alpha (empty: `baselines.FC_GRID`).
    """

    detrend: bool = True
    high_pass: float | None = 0.01
    low_pass: float | None = 0.1
    # slow-5 .. slow-2 (Zuo et al. 2010); the last is clipped at the Nyquist frequency (0.227 Hz at the default model TR)
    bands: tuple[tuple[float, float], ...] = ((0.01, 0.027), (0.027, 0.073), (0.073, 0.198), (0.198, 0.25))
    c_grid: tuple[float, ...] = ()
    alpha_grid: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("high_pass", "low_pass"):
            v = getattr(self, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"baselines.{name}: expected a frequency >= 0 Hz (null or 0: off), got {v}")
        if self.high_pass and self.low_pass and self.high_pass >= self.low_pass:
            raise ConfigError(f"baselines: high_pass ({self.high_pass} Hz) must be below low_pass ({self.low_pass} Hz)")
        if not self.bands:
            raise ConfigError("baselines.bands: expected at least one (low, high) band in Hz, got none")
        for i, (lo, hi) in enumerate(self.bands):
            if not (0 <= lo < hi and math.isfinite(hi)):
                raise ConfigError(f"baselines.bands[{i}]: expected 0 <= low < high (Hz), got [{lo}, {hi}]")
        for name in ("c_grid", "alpha_grid"):
            bad = [g for g in getattr(self, name) if not (g > 0 and math.isfinite(g))]
            if bad:
                raise ConfigError(f"baselines.{name}: expected positive strengths, got {bad}")
