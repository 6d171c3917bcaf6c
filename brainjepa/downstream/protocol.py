"""Evaluation protocols as files: which sites pretrain, which fine-tune, which are held out; tasks; methods.

A protocol YAML (see `configs/protocols/`) is read by the one strict loader; besides types and choices,
`load_protocol` checks what a typo would otherwise turn into a wrong table: every site an experiment
names is declared, every declared site's YAML loads, and every task's column exists in every site's
participants file that the task is evaluated on. Errors name the protocol file, the key and the value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from brainjepa.config import PosEmbed
from brainjepa.downstream.config import DownstreamConfig, TaskSpec
from sites.config import SiteConfig, load_site_config
from sites.errors import ConfigError, where
from sites.participants import read_participants
from sites.schema import check_choices, from_mapping, read_yaml_mapping

MethodName = Literal["finetune", "probe", "scratch", "random_probe", "fc"]
Training = Literal["federated", "centralized", "local"]


@dataclass(frozen=True)
class SiteRef:
    name: str
    config: str  # the site YAML (relative to the protocol file)
    group: str = ""  # population group (cross-ethnicity protocols)


@dataclass(frozen=True)
class PretrainPlan:
    config: str = ""  # pretraining YAML (model / mask / optim / train sections; its data section is replaced)
    steps: int = 300
    seed: int = 0


@dataclass(frozen=True)
class Ablation:
    """A pretraining variant whose backbone is fine-tuned and probed like the main one."""

    name: str
    pos_embed: PosEmbed = "gradient"  # learned_roi / sincos_roi: positions without brain gradients
    mask_mode: Literal["spatiotemporal", "random"] = "spatiotemporal"

    def __post_init__(self) -> None:
        check_choices(self, f"ablation '{self.name}'")


@dataclass(frozen=True)
class Experiment:
    name: str
    finetune: tuple[str, ...]  # sites whose train / val splits fine-tune and select the model
    test: tuple[str, ...]  # sites whose test split is scored (once per seed)
    pretrain: tuple[str, ...] = ()  # sites the backbone is pretrained on (pooled, each site its own scaling)
    checkpoint: str = ""  # or: an existing pretraining checkpoint (relative to the protocol file)


@dataclass(frozen=True)
class Protocol:
    name: str
    sites: tuple[SiteRef, ...]
    tasks: tuple[TaskSpec, ...]
    experiments: tuple[Experiment, ...]
    methods: tuple[MethodName, ...] = ("finetune", "probe", "scratch", "random_probe", "fc")
    training: tuple[Training, ...] = ("federated", "centralized", "local")
    training_methods: tuple[MethodName, ...] = ("finetune",)  # run in every `training` mode; others centralized
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    recipe: DownstreamConfig = field(default_factory=DownstreamConfig)  # method and seed set per run
    local_steps: int = 10  # federated: optimizer steps per site per round
    pretrain: PretrainPlan = field(default_factory=PretrainPlan)
    ablations: tuple[Ablation, ...] = ()
    description: str = ""
    source: Path = field(default=Path("<memory>"), compare=False)

    def site(self, name: str) -> SiteRef:
        return next(s for s in self.sites if s.name == name)

    def site_config(self, name: str) -> SiteConfig:
        return load_site_config(self.source.parent / self.site(name).config)


def load_protocol(path: str | Path) -> Protocol:
    path = Path(path)
    raw = read_yaml_mapping(path, "protocol")
    proto = dataclasses.replace(from_mapping(Protocol, raw, path), source=path)
    _check(proto, path)
    return proto


def _check(p: Protocol, path: Path) -> None:
    names = [s.name for s in p.sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where(path, 'sites')}: site names must be unique, got {names}")
    for i, e in enumerate(p.experiments):
        for key in ("finetune", "test", "pretrain"):
            for s in getattr(e, key):
                if s not in names:
                    raise ConfigError(f"{where(path, f'experiments[{i}].{key}')}: site '{s}' of experiment "
                                      f"'{e.name}' is not declared under 'sites' ({', '.join(names)})")  # fmt: skip
        if not e.finetune or not e.test:
            raise ConfigError(f"{where(path, f'experiments[{i}]')}: experiment '{e.name}' needs 'finetune' and 'test' sites")
        if bool(e.pretrain) == bool(e.checkpoint) and any(m in p.methods for m in ("finetune", "probe")):
            raise ConfigError(f"{where(path, f'experiments[{i}]')}: experiment '{e.name}' needs exactly one of "
                              "'pretrain' (sites) or 'checkpoint' for the pretrained methods")  # fmt: skip
    if not p.seeds or not p.tasks or not p.methods:
        raise ConfigError(f"{where(path)}: 'seeds', 'tasks' and 'methods' must not be empty")
    used = {s for e in p.experiments for s in (*e.finetune, *e.test)}
    for name in sorted(used):
        cfg = p.site_config(name)
        header = read_participants(cfg.participants.file, cfg.participants.id_column).columns
        for t in p.tasks:
            if t.column not in header:
                raise ConfigError(f"{where(path, 'tasks')}: task '{t.name}' uses column '{t.column}', which site "
                                  f"'{name}' ({cfg.participants.file}) does not have; it has {sorted(header)}")  # fmt: skip


def pretrain_key(p: Protocol, sites: tuple[str, ...], ablation: Ablation | None) -> str:
    """A stable folder name for one pretraining run (reused across experiments and re-runs)."""
    cfg = p.source.parent / p.pretrain.config if p.pretrain.config else None
    recipe = cfg.read_text() if cfg is not None and cfg.is_file() else ""  # an edited recipe is a new run
    blob = json.dumps([sorted(sites), dataclasses.asdict(p.pretrain), dataclasses.asdict(ablation) if ablation else None,
                       recipe], sort_keys=True, default=str)  # fmt: skip
    label = ablation.name.replace(" ", "_") if ablation else "main"
    return f"{'+'.join(sorted(sites))}-{label}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"
