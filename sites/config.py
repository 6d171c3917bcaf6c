"""A site's YAML config: where its data lives, how it is laid out, and what it must agree on.

Relative paths are resolved once, when the file is parsed, so a parsed `SiteConfig` holds only absolute
paths whatever the working directory: `data.root` and `rois[*].atlas` against the YAML file's folder,
`data.output` and `participants.file` against `data.root`. Subject file patterns use
`{subject}` (the participants id as written, e.g. `sub-001`) and `{label}` (the id without a leading
`sub-`), and may contain `*` wildcards that must match exactly one file. See `docs/data.md` and
`configs/site_*.yaml` for documented examples of both formats.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from brainjepa.errors import ConfigError, where
from brainjepa.schema import from_mapping, read_yaml_mapping
from sites.missing import MissingPolicy


@dataclass(frozen=True)
class RoiBlock:
    """One contiguous block of the ROI layout (e.g. 50 Tian-III subcortical ROIs, then 400 Schaefer)."""

    name: str
    n_rois: int
    atlas: Path | None = None  # nifti format: an integer label image for this block
    labels: tuple[int, ...] | None = None  # nifti: label values in ROI order (default: sorted non-zero)
    file: str | None = None  # roi format: this block's per-subject file pattern (UKB-style split files)


# What to do with a participants row that has no data file, or a scan shorter than the model window
SkipPolicy = Literal["error", "skip"]


@dataclass(frozen=True)
class SiteFiles:
    """The `data` section of a site YAML: where the site's files are and how they are read."""

    format: Literal["nifti", "roi"]
    root: Path = Path(".")
    # roi format: one per-subject file holding every ROI (else each RoiBlock names its own `file`)
    file: str | None = None
    orientation: Literal["rois_x_time", "time_x_rois"] = "rois_x_time"
    csv_header: bool | None = None  # CSV/TSV first row = column names? null: detect (non-numeric cells)
    # nifti format: BIDS-derivatives pattern of the 4D BOLD image and (optional) confounds TSV
    bold: str = "{subject}/func/{subject}_*space-MNI152NLin6Asym*_bold.nii.gz"
    confounds: str | None = None
    output: Path = Path("derivatives/brainjepa")  # where `prepare` writes ROI series + manifest
    on_missing: SkipPolicy = "error"  # participants row without a data file
    on_short: SkipPolicy = "error"  # scan shorter than the model window


@dataclass(frozen=True)
class PreprocessConfig:
    """nilearn signal cleaning applied by `prepare` (NiftiLabelsMasker arguments)."""

    detrend: bool = False
    high_pass: float | None = None  # Hz
    low_pass: float | None = None  # Hz
    confound_columns: tuple[str, ...] = ()  # columns of the confounds TSV to regress out
    drop_initial: int = 0  # non-steady-state frames dropped at the start (counted as frames lost)
    n_jobs: int = 2  # subjects processed in parallel
    # frame censoring (sites.scrub): frames with framewise displacement > scrub_fd mm are censored; a scan
    # keeps its longest uncensored stretch. FD from `fd_file` (per-subject pattern) or the confounds TSV.
    scrub_fd: float | None = None  # mm; None: off
    fd_column: str = "framewise_displacement"
    fd_file: str | None = None
    # ROIs all-zero / constant / NaN in a scan (partial coverage), sites.missing: `error` (name them),
    # `skip_scan` (drop such scans, counted), `mask` (keep the scan, those ROIs marked missing)
    missing_rois: MissingPolicy = "error"
    # prepare (NIfTI): a ROI with a smaller share of its voxels inside the data (non-zero) is missing; 0: off
    min_coverage: float = 0.0


@dataclass(frozen=True)
class ParticipantsConfig:
    file: Path = Path("participants.tsv")
    id_column: str = "participant_id"
    # The subject of each row when a subject has several scans (runs, sessions): splits are drawn by
    # subject, so all of a subject's scans land in one split. None: every row is its own subject.
    subject_column: str | None = None
    # BIDS runs: each file of a subject with a `run-<label>` entity is its own scan (row `<id>_run-<label>`),
    # keyed to its subject (splits by subject); see sites.layout
    runs: bool = False
    phenotypes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SplitConfig:
    """Either a participants column holding train/val/test, or fractions drawn with a seed."""

    column: str | None = None
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    seed: int = 0


# Top-level keys of a site YAML about how the site trains, not about its data (device, speed switches,
# privacy budget, several devices): `sites` passes them on unparsed and the training side checks them.
RUNTIME_KEYS = ("device", "perf", "privacy", "distributed")


@dataclass(frozen=True)
class SiteConfig:
    # Keys a site YAML once had (key -> what to use instead): an error naming the file and the key.
    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "batch_size": "a site's batch size was never used; federated rounds use the run config's 'batch-size', "
        "`brainjepa pretrain` the pretraining YAML's train.batch_size"
    }

    site: str
    data: SiteFiles
    rois: tuple[RoiBlock, ...]
    tr: float | None = None  # seconds; nifti: read from the header when null
    participants: ParticipantsConfig = field(default_factory=ParticipantsConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    source: Path = field(default=Path("<memory>"), compare=False)  # the YAML file (set by the loader)

    @property
    def n_rois(self) -> int:
        return sum(b.n_rois for b in self.rois)

    @property
    def roi_names(self) -> list[str]:
        """One name per ROI, in model order: `<block>_<index within block>`."""
        return [f"{b.name}_{i}" for b in self.rois for i in range(b.n_rois)]

    @property
    def output_dir(self) -> Path:
        """Where `prepare` writes; `data.output` is already absolute in a parsed config (joined once)."""
        out = self.data.output
        return out if out.is_absolute() else self.data.root / out


# ROI-series input: a declared TR outside this range (seconds) is almost surely a unit slip (ms, minutes)
TR_RANGE = (0.3, 5.0)


def _resolve(base: Path, p: Path | None) -> Path | None:
    """`p` made absolute against `base` (itself made absolute against the working directory), normalised
    (`..` removed) but with symlinks kept as written."""
    if p is None:
        return None
    return Path(os.path.abspath(base / p.expanduser()))


def _validate(cfg: SiteConfig) -> None:
    f = cfg.source

    def err(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{where(f, key)}: {msg}")

    if not cfg.site.strip():
        raise err("site", "expected a non-empty site name")
    if cfg.tr is not None and cfg.tr <= 0:
        raise err("tr", f"expected a repetition time in seconds > 0, got {cfg.tr}")
    if cfg.data.format == "roi" and cfg.tr is None:
        raise err("tr", "ROI-series input has no header to read the TR from: set 'tr' (seconds)")
    if cfg.data.format == "roi" and not TR_RANGE[0] <= cfg.tr <= TR_RANGE[1]:
        raise err(
            "tr",
            f"expected a repetition time in seconds within {TR_RANGE[0]}-{TR_RANGE[1]}, got {cfg.tr} "
            "(milliseconds instead of seconds?)",
        )
    if not cfg.rois:
        raise err("rois", "expected at least one ROI block")
    names = [b.name for b in cfg.rois]
    if len(set(names)) != len(names):
        raise err("rois", f"block names must be unique, got {names}")
    for i, b in enumerate(cfg.rois):
        if b.n_rois <= 0:
            raise err(f"rois[{i}].n_rois", f"expected a positive ROI count, got {b.n_rois}")
        if b.labels is not None and len(b.labels) != b.n_rois:
            raise err(f"rois[{i}].labels", f"has {len(b.labels)} labels but n_rois is {b.n_rois}")
        if cfg.data.format == "nifti" and b.atlas is None:
            raise err(f"rois[{i}].atlas", "format 'nifti' needs a label atlas image for every ROI block")
    if cfg.data.format == "roi":
        per_block = [b.file is not None for b in cfg.rois]
        if cfg.data.file is None and not all(per_block):
            raise err(
                "data.file", "format 'roi' needs 'data.file' (all ROIs in one file) or a 'file' in every ROI block"
            )
        if cfg.data.file is not None and any(per_block):
            raise err("data.file", "give either 'data.file' or per-block 'file' patterns, not both")
    for key, pat in [("data.file", cfg.data.file), ("data.bold", cfg.data.bold)] + [
        (f"rois[{i}].file", b.file) for i, b in enumerate(cfg.rois)
    ]:
        if pat is not None and "{subject}" not in pat and "{label}" not in pat:
            raise err(key, f"pattern '{pat}' must contain '{{subject}}' or '{{label}}'")
    if cfg.participants.runs and cfg.data.format == "roi" and cfg.data.file is None:
        raise err("participants.runs", "BIDS runs need one file per scan: 'data.file' (not per-block 'file' patterns)")
    s = cfg.split
    if s.column is None:
        fr = (s.train, s.val, s.test)
        if min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
            raise err("split", f"train/val/test fractions must be >= 0 and sum to 1, got {fr}")
    if cfg.preprocess.drop_initial < 0:
        raise err("preprocess.drop_initial", f"expected a frame count >= 0, got {cfg.preprocess.drop_initial}")
    if cfg.preprocess.n_jobs <= 0:
        raise err("preprocess.n_jobs", f"expected a positive integer, got {cfg.preprocess.n_jobs}")
    for key, v in (
        ("preprocess.high_pass", cfg.preprocess.high_pass),
        ("preprocess.low_pass", cfg.preprocess.low_pass),
    ):
        if v is not None and v <= 0:
            raise err(key, f"expected a frequency in Hz > 0, got {v}")
    pp = cfg.preprocess
    if not 0.0 <= pp.min_coverage <= 1.0:
        raise err("preprocess.min_coverage", f"expected a share of voxels in [0, 1], got {pp.min_coverage}")
    if pp.scrub_fd is not None and pp.scrub_fd <= 0:
        raise err("preprocess.scrub_fd", f"expected an FD threshold in mm > 0, got {pp.scrub_fd}")
    no_fd = pp.fd_file is None and (cfg.data.format == "roi" or cfg.data.confounds is None)
    if pp.scrub_fd is not None and no_fd:
        raise err(
            "preprocess.fd_file",
            "scrub_fd needs FD per frame: set 'preprocess.fd_file' (a per-subject "
            "pattern) or, for NIfTI input, 'data.confounds'",
        )
    if pp.fd_file is not None and "{subject}" not in pp.fd_file and "{label}" not in pp.fd_file:
        raise err("preprocess.fd_file", f"pattern '{pp.fd_file}' must contain '{{subject}}' or '{{label}}'")


def parse_site_config(data: object, source: Path | str = "<memory>") -> SiteConfig:
    """Build a SiteConfig from an already-parsed mapping; relative paths resolve against `source`'s folder.
    The runtime keys (`RUNTIME_KEYS`) are left out: the training side checks them (`brainjepa.config`)."""
    return _parse(data, Path(source))[0]


def _parse(data: object, source: Path) -> tuple[SiteConfig, dict]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where(source)}: expected a YAML mapping at the top level, got {type(data).__name__}")
    if "source" in data:
        raise ConfigError(f"{where(source, 'source')}: unknown key (reserved: set by the loader)")
    runtime = {k: v for k, v in data.items() if k in RUNTIME_KEYS}
    cfg = from_mapping(SiteConfig, {k: v for k, v in data.items() if k not in RUNTIME_KEYS}, source)
    base = source.parent if source.name != "<memory>" else Path.cwd()
    root = _resolve(base, cfg.data.root)
    data_cfg = dataclasses.replace(cfg.data, root=root, output=_resolve(root, cfg.data.output))
    blocks = tuple(dataclasses.replace(b, atlas=_resolve(base, b.atlas)) for b in cfg.rois)
    parts = dataclasses.replace(cfg.participants, file=_resolve(root, cfg.participants.file))
    cfg = dataclasses.replace(cfg, data=data_cfg, rois=blocks, participants=parts, source=source)
    _validate(cfg)
    return cfg, runtime


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and check a site YAML file's data description. Errors name the file and the offending key."""
    return load_site_yaml(path)[0]


def load_site_yaml(path: str | Path) -> tuple[SiteConfig, dict]:
    """Read a site YAML once: (its checked data description, its runtime sections as parsed mappings).
    The training side turns the second into `brainjepa.config.SiteRuntime`."""
    path = Path(path)
    return _parse(read_yaml_mapping(path, "site config"), path)


def site_config_to_dict(cfg: SiteConfig) -> dict:
    """The YAML-ready mapping of a config (paths as strings; `source` left out)."""

    def conv(v: object) -> object:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    d = dataclasses.asdict(cfg)
    d.pop("source")
    return conv(d)
