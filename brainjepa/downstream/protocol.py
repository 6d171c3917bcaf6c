"""Evaluation protocols as files: which sites pretrain, which fine-tune, which are held out; tasks; methods.

A protocol is frozen before any test split is read: everything a result depends on (the recipe, steps,
windows, pooling, baselines and their settings, how a test-only site is scaled, which generated cohorts)
is declared in it, and `brainjepa evaluate` records its hash in `provenance.json`.

A protocol YAML (see `configs/protocols/`) is read by the one strict loader; besides types and choices,
`load_protocol` checks what a typo would otherwise turn into a wrong table: every site an experiment
names is declared, every declared site's YAML loads, and every task's column exists in every site's
participants file that the task is evaluated on. Errors name the protocol file, the key and the value.

Generated cohorts: a protocol with a `generate` section (the `brainjepa synth` arguments, the generator
version pinned) generates its own sites, once per entry of `generator_seeds`; its sites then name the
generated sites (`site_a`, ...) and need no `config`. `for_cohort` gives the protocol of one generated
cohort, with every site's YAML resolved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from brainjepa.config import MaskMode, PosEmbed
from brainjepa.downstream.config import Baseline, BaselineConfig, DownstreamConfig, Method, TaskSpec
from brainjepa.errors import ConfigError, where
from brainjepa.schema import check_choices, from_mapping, read_yaml_mapping
from sites.config import SiteConfig, load_site_config
from sites.participants import read_participants

MethodName = Literal[Method, Baseline]  # a neural method or a baseline
Training = Literal["federated", "centralized", "local"]
# How a site that only tests (no training split) is scaled: with the statistics of the experiment's
# fine-tuning sites' training scans (what a new site meets), or with its own scans (label-free, but it
# adapts to the test data: worth many points to an amplitude reader).
TestSiteScaling = Literal["training_sites", "own_scans"]
Mechanism = Literal["mixed", "coupling", "amplitude", "spectrum", "null"]  # sites.mechanisms
GENERATED_COLUMNS = ("age", "sex", "diagnosis", "population", "site")


@dataclass(frozen=True)
class SiteRef:
    name: str
    config: str = ""  # the site YAML (relative to the protocol file); generated sites: none
    group: str = ""  # population group (cross-ethnicity protocols)


@dataclass(frozen=True)
class GeneratorPlan:
    """`brainjepa synth` arguments of a protocol's generated cohorts (one cohort per generator seed)."""

    version: int  # the generator version, pinned: a newer generator is a new protocol
    sites: int = 4
    subjects: int = 80
    rois: int = 50
    duration: float = 400.0  # seconds, every site
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    mechanism: Mechanism = "mixed"
    effects: tuple[str, ...] = ()  # KEY=VALUE overrides of `sites.synth.Effects`
    held_out: tuple[str, ...] = ()  # sites written with every scan in the test split (new sites)

    def __post_init__(self) -> None:
        check_choices(self, "generate")


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
    mask_mode: MaskMode = "spatiotemporal"

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
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    test_site_scaling: TestSiteScaling = "training_sites"
    generate: GeneratorPlan | None = None
    generator_seeds: tuple[int, ...] = ()  # one generated cohort per seed (needs `generate`)
    n_bootstrap: int = 2000  # subject resamples per interval
    description: str = ""
    source: Path = field(default=Path("<memory>"), compare=False)
    cohort: str = field(default="", compare=False)  # set by `for_cohort`: "gen<seed>" for a generated cohort

    def site(self, name: str) -> SiteRef:
        return next(s for s in self.sites if s.name == name)

    def site_config(self, name: str) -> SiteConfig:
        if not self.site(name).config:
            raise ConfigError(
                f"{where(self.source, 'sites')}: site '{name}' has no config; a generated site's is "
                "set per cohort (`for_cohort`)"
            )
        return load_site_config(self.source.parent / self.site(name).config)

    @property
    def cohort_seeds(self) -> tuple[int | None, ...]:
        """The generated cohorts' seeds, or (None,): the protocol's own sites."""
        return self.generator_seeds if self.generate is not None else (None,)

    def for_cohort(self, seed: int, root: Path) -> Protocol:
        """This protocol on the generated cohort of `seed` written under root/<site>/<site>.yaml."""
        sites = tuple(
            dataclasses.replace(s, config=str((root / s.name / f"{s.name}.yaml").resolve())) for s in self.sites
        )
        return dataclasses.replace(self, sites=sites, cohort=f"gen{seed}")


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
                    raise ConfigError(
                        f"{where(path, f'experiments[{i}].{key}')}: site '{s}' of experiment "
                        f"'{e.name}' is not declared under 'sites' ({', '.join(names)})"
                    )
        if not e.finetune or not e.test:
            raise ConfigError(
                f"{where(path, f'experiments[{i}]')}: experiment '{e.name}' needs 'finetune' and 'test' sites"
            )
        if bool(e.pretrain) == bool(e.checkpoint) and any(m in p.methods for m in ("finetune", "probe")):
            raise ConfigError(
                f"{where(path, f'experiments[{i}]')}: experiment '{e.name}' needs exactly one of "
                "'pretrain' (sites) or 'checkpoint' for the pretrained methods"
            )
    if not p.seeds or not p.tasks or not p.methods:
        raise ConfigError(f"{where(path)}: 'seeds', 'tasks' and 'methods' must not be empty")
    if p.n_bootstrap < 100:
        raise ConfigError(f"{where(path, 'n_bootstrap')}: expected at least 100 resamples, got {p.n_bootstrap}")
    if p.generate is not None:
        _check_generated(p, path)
        return
    if p.generator_seeds:
        raise ConfigError(f"{where(path, 'generator_seeds')}: needs a 'generate' section (the cohorts to generate)")
    missing = [s.name for s in p.sites if not s.config]
    if missing:
        raise ConfigError(
            f"{where(path, 'sites')}: sites {missing} need a 'config' (a site YAML), or the "
            "protocol a 'generate' section"
        )
    used = {s for e in p.experiments for s in (*e.finetune, *e.test)}
    for name in sorted(used):
        cfg = p.site_config(name)
        header = read_participants(cfg.participants.file, cfg.participants.id_column).columns
        for t in p.tasks:
            if t.column not in header:
                raise ConfigError(
                    f"{where(path, 'tasks')}: task '{t.name}' uses column '{t.column}', which site "
                    f"'{name}' ({cfg.participants.file}) does not have; it has {sorted(header)}"
                )


def _check_generated(p: Protocol, path: Path) -> None:
    from sites.acquisition import default_site_specs

    if not p.generator_seeds:
        raise ConfigError(
            f"{where(path, 'generator_seeds')}: a protocol that generates its cohorts needs at least "
            "one generator seed (claims about generated data: 5 or more)"
        )
    if len(set(p.generator_seeds)) != len(p.generator_seeds):
        raise ConfigError(f"{where(path, 'generator_seeds')}: seeds must be unique, got {list(p.generator_seeds)}")
    names = [s.name for s in default_site_specs(p.generate.sites)]
    for s in p.generate.held_out:
        if s not in names:
            raise ConfigError(f"{where(path, 'generate.held_out')}: '{s}' is not one of the generated sites {names}")
    for s in p.sites:
        if s.config:
            raise ConfigError(f"{where(path, 'sites')}: site '{s.name}' is generated ('generate'); drop its 'config'")
        if s.name not in names:
            raise ConfigError(
                f"{where(path, 'sites')}: site '{s.name}' is not one of the {p.generate.sites} generated sites {names}"
            )
    for t in p.tasks:
        if t.column not in GENERATED_COLUMNS:
            raise ConfigError(
                f"{where(path, 'tasks')}: task '{t.name}' uses column '{t.column}'; generated sites "
                f"have {list(GENERATED_COLUMNS)}"
            )


def protocol_hash(p: Protocol) -> str:
    """sha256 of the resolved protocol (every field, defaults included) and its pretraining recipe's text:
    the identity of a frozen protocol. The cohort a copy is resolved to and the file it came from are not
    part of it."""
    cfg = p.source.parent / p.pretrain.config if p.pretrain.config else None
    recipe = cfg.read_text() if cfg is not None and cfg.is_file() else ""
    return hashlib.sha256(json.dumps([resolved(p), recipe], sort_keys=True, default=str).encode()).hexdigest()


def resolved(p: Protocol) -> dict:
    """The protocol as plain data, every default filled in (for provenance.json)."""
    out = dataclasses.asdict(p)
    out.pop("source"), out.pop("cohort")
    return out


def pretrain_key(p: Protocol, sites: tuple[str, ...], ablation: Ablation | None) -> str:
    """A stable folder name for one pretraining run (reused across experiments and re-runs)."""
    cfg = p.source.parent / p.pretrain.config if p.pretrain.config else None
    recipe = cfg.read_text() if cfg is not None and cfg.is_file() else ""  # an edited recipe is a new run
    generated = dataclasses.asdict(p.generate) if p.generate is not None else None
    blob = json.dumps(
        [
            sorted(sites),
            dataclasses.asdict(p.pretrain),
            dataclasses.asdict(ablation) if ablation else None,
            recipe,
            generated,
            p.cohort,
        ],
        sort_keys=True,
        default=str,
    )
    label = ablation.name.replace(" ", "_") if ablation else "main"
    cohort = f"{p.cohort}-" if p.cohort else ""
    return f"{cohort}{'+'.join(sorted(sites))}-{label}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"
