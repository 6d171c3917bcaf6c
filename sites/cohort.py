"""One site's cohort in memory: every subject's ROI series at the model TR, with phenotypes and splits.

`load_cohort(source, model_tr)` is the one entry point of training code: a parsed site config (or a
folder of `.npy` series) -> the training subjects, resampled and scaled. Below it, `load_site_series`
reads a site with its phenotypes and splits (what fine-tuning and the data commands need). It matches
`participants.tsv` rows to per-subject files (a row without a file, or a file without a row, is an
error naming both, unless `data.on_missing: skip`), reads and checks each series, resamples it to the
model TR (after frame censoring, `preprocess.scrub_fd`: a censored scan keeps its longest uncensored
stretch, see `sites.scrub`) and, given `min_frames`, rejects (or with `data.on_short: skip`, drops and counts) scans
shorter than the model window. NIfTI sites are read from `prepare`'s output folder and manifest.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainjepa.errors import DataError, where
from sites.config import SiteConfig
from sites.layout import discover_subjects, fill, find_subject_file, read_site_participants, subject_column
from sites.manifest import read_manifest
from sites.missing import apply_policy, log_missing
from sites.participants import Participants
from sites.roi_io import read_roi_dir, read_roi_file
from sites.scaling import PerScanScaling, RobustScaling, Scaling, check_spread, fit_method
from sites.scrub import censor, log_censoring, read_fd
from sites.temporal import DEFAULT_MODEL_TR, n_frames_after, resample

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SiteSeries:
    site: str
    series: list[np.ndarray]  # N x float32 (R, L_i), at `tr`
    subject_ids: list[str]
    phenotypes: dict[str, np.ndarray]  # column -> (N,) float64 (NaN = missing) or str
    splits: np.ndarray  # (N,) 'train' | 'val' | 'test'
    n_rois: int
    tr: float  # seconds (the model TR)
    source: Path  # the site YAML
    files: list[tuple[Path, ...]] = field(default_factory=list)  # N x the files each series came from
    skipped: dict[str, str] = field(default_factory=dict)  # subject id -> reason
    # frame censoring (`preprocess.scrub_fd`, sites.scrub): subject id -> {"frames", "censored", "kept"} at
    # the site TR; every subject read while censoring is on (also those later skipped as too short)
    censored: dict[str, dict[str, int]] = field(default_factory=dict)
    # missing ROIs (`preprocess.missing_rois`, sites.missing): subject id -> 0-based ROI indices, for every
    # scan read with any (also those skipped); under `mask` those rows of `series` are NaN
    missing: dict[str, list[int]] = field(default_factory=dict)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([s.shape[1] for s in self.series], dtype=np.int64)  # (N,)

    def __len__(self) -> int:
        return len(self.series)

    def subset(self, split: str) -> SiteSeries:
        """Only the subjects of one split ('train', 'val' or 'test')."""
        if split not in SPLITS:
            raise DataError(f"unknown split '{split}', expected one of {SPLITS}")
        keep = np.flatnonzero(self.splits == split)
        return dataclasses.replace(
            self,
            series=[self.series[i] for i in keep],
            subject_ids=[self.subject_ids[i] for i in keep],
            phenotypes={k: v[keep] for k, v in self.phenotypes.items()},
            splits=self.splits[keep],
            files=[self.files[i] for i in keep] if self.files else [],
        )


def assign_splits(ids: list[str], cfg: SiteConfig, parts: Participants) -> np.ndarray:
    """(N,) split names: from the participants column, or drawn once with the split seed.

    With `participants.subject_column` (the subject of each scan when a subject has several runs),
    whole subjects are drawn, so no subject is in two splits; a given split column that puts one
    subject in two splits is an error naming the subject.
    """
    s = cfg.split
    subject = subject_column(cfg)  # participants.subject_column, or the id column with participants.runs
    groups = None
    if subject is not None:
        groups = dict(zip(parts.ids, (str(g) for g in parts.column(subject)), strict=True))
    if s.column is not None:
        col = parts.column(s.column)
        bad = sorted({str(v) for v in col} - set(SPLITS))
        if bad:
            raise DataError(f"{where(parts.source, s.column)}: split values must be {SPLITS}, got {bad}")
        by_id = dict(zip(parts.ids, col, strict=True))
        if groups is not None:
            seen: dict[str, str] = {}
            for sid in parts.ids:
                first = seen.setdefault(groups[sid], str(by_id[sid]))
                if first != str(by_id[sid]):
                    raise DataError(
                        f"{where(parts.source, s.column)}: {subject} '{groups[sid]}' is in "
                        f"both '{first}' and '{by_id[sid]}' (one subject must stay in one split)"
                    )
        return np.array([by_id[i] for i in ids], dtype="<U5")
    units = sorted(set(groups.values())) if groups is not None else sorted(parts.ids)  # row order and skips
    perm = np.random.default_rng(s.seed).permutation(len(units))  # do not change the draw
    n_train = int(round(s.train * len(units)))
    n_val = int(round(s.val * len(units)))
    names = np.empty(len(units), dtype="<U5")
    names[perm[:n_train]] = "train"
    names[perm[n_train : n_train + n_val]] = "val"
    names[perm[n_train + n_val :]] = "test"
    if groups is not None:
        of_group = dict(zip(units, names, strict=True))
        return np.array([of_group[groups[i]] for i in ids], dtype="<U5")
    order = units
    by_id = dict(zip(order, names, strict=True))
    return np.array([by_id[i] for i in ids], dtype="<U5")


def _subject_sources(
    cfg: SiteConfig, parts: Participants, censored: dict[str, dict[str, int]]
) -> tuple[dict[str, list[Path]], dict[str, float], dict[str, str]]:
    """Per subject: the files to concatenate (ROI-block order), its TR, and the subjects skipped; fills
    `censored` with what `prepare` already censored (NIfTI, manifest `qc.censoring`)."""
    root = cfg.data.root
    skipped: dict[str, str] = {}
    files: dict[str, list[Path]] = {}
    trs: dict[str, float] = {}
    if cfg.data.format == "nifti":
        manifest = read_manifest(cfg.output_dir, cfg.source)
        subjects = manifest.get("subjects", {})
        for sid in parts.ids:
            entry = subjects.get(sid)
            if entry is None or entry.get("status") != "ok":
                why = "not prepared" if entry is None else f"prepare failed: {entry.get('error', '?')}"
                skipped[sid] = why
                continue
            files[sid] = [cfg.output_dir / entry["file"]]
            if "censoring" in entry.get("qc", {}):
                censored[sid] = {k: int(entry["qc"]["censoring"][k]) for k in ("frames", "censored", "kept")}
            trs[sid] = float(cfg.tr if cfg.tr is not None else entry["tr"])
        if not files:
            raise DataError(
                f"{where(cfg.source)}: no prepared subjects in '{cfg.output_dir}' (run `brainjepa prepare --site "
                f"{cfg.source}` first)"
            )
        return files, trs, skipped
    patterns = (
        [("data.file", cfg.data.file)]
        if cfg.data.file is not None
        else [(f"rois[{i}].file", b.file) for i, b in enumerate(cfg.rois)]
    )
    missing: list[str] = []
    runs = cfg.participants.runs
    for sid in parts.ids:
        paths = [find_subject_file(root, pat, sid, key, cfg.source, runs) for key, pat in patterns]
        if any(p is None for p in paths):
            absent = [fill(pat, sid) for (key, pat), p in zip(patterns, paths, strict=True) if p is None]
            missing.append(f"'{sid}' (no {', '.join(absent)})")
            skipped[sid] = "no data file"
            continue
        files[sid] = paths
        trs[sid] = float(cfg.tr)
    known = set(parts.ids) | (set(parts.column(cfg.participants.id_column)) if runs else set())
    orphans = sorted({sid for key, pat in patterns for sid in discover_subjects(root, pat)} - known)
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} participants row(s) without a data file under '{root}': {', '.join(missing[:5])}"
        )
    if orphans:
        problems.append(
            f"{len(orphans)} data file(s) whose subject has no row in '{parts.source}': {', '.join(orphans[:5])}"
        )
    if problems:
        msg = f"{where(cfg.source, 'data')}: " + "; ".join(problems)
        if cfg.data.on_missing == "error":
            raise DataError(msg + " (set 'data.on_missing: skip' to skip them)")
        log.warning("%s (skipped)", msg)
    if not files:
        raise DataError(f"{where(cfg.source, 'data')}: no subject has a data file under '{root}'")
    return files, trs, skipped


def load_site_series(
    cfg: SiteConfig,
    model_tr: float = DEFAULT_MODEL_TR,
    split: str | tuple[str, ...] | None = None,
    min_frames: int | None = None,
    method: str = "polyphase",
    progress: bool = False,
) -> SiteSeries:
    """Load a site's subjects as float32 (R, L_i) series at `model_tr` (see module doc). `split`: only
    that split's (or those splits') subjects; the other subjects' files are never opened."""
    parts = read_site_participants(cfg)  # participants.runs: one row per run file
    censored: dict[str, dict[str, int]] = {}  # prepared NIfTI: censored by `prepare` (nilearn sample_mask)
    files, trs, skipped = _subject_sources(cfg, parts, censored)
    done_by_prepare = set(censored)
    ids = [sid for sid in parts.ids if sid in files]
    wanted = (split,) if isinstance(split, str) else split
    if wanted is not None and (not wanted or set(wanted) - set(SPLITS)):
        raise DataError(f"unknown split {split!r}, expected one or more of {SPLITS}")
    splits = assign_splits(ids, cfg, parts)
    if wanted is not None:
        ids = [sid for sid, s in zip(ids, splits, strict=True) if s in wanted]
    series: list[np.ndarray] = []
    kept: list[str] = []
    short: list[str] = []
    missing: dict[str, list[int]] = {}
    iterator = ids
    if progress:
        from tqdm import tqdm

        iterator = tqdm(ids, desc=f"loading {cfg.site}", unit="subject")
    orientation = cfg.data.orientation if cfg.data.format == "roi" else "rois_x_time"
    hdr = cfg.data.csv_header
    for sid in iterator:
        if len(files[sid]) == 1:
            x = read_roi_file(files[sid][0], orientation, n_rois=cfg.n_rois, check=False, csv_header=hdr)
        else:  # UKB style: one file per ROI block, concatenated in the declared order
            blocks = [
                read_roi_file(p, orientation, n_rois=b.n_rois, check=False, csv_header=hdr)
                for p, b in zip(files[sid], cfg.rois, strict=True)
            ]
            lens = {b.shape[1] for b in blocks}
            if len(lens) != 1:
                raise DataError(
                    f"{where(files[sid][0])}: subject '{sid}' has ROI blocks of different lengths {sorted(lens)}"
                )
            x = np.concatenate(blocks, axis=0)  # (R, L)
        x, miss = apply_policy(x, cfg.preprocess.missing_rois, files[sid][0], sid)
        if miss.size:
            missing[sid] = miss.tolist()
        if x is None:
            skipped[sid] = f"missing ROI(s) {miss[:10].tolist()} (preprocess.missing_rois)"
            continue
        if cfg.preprocess.scrub_fd is not None and sid not in done_by_prepare:
            x, censored[sid] = _censor_subject(cfg, sid, x)
        n_out = n_frames_after(x.shape[1], trs[sid], model_tr)
        if min_frames is not None and n_out < min_frames:
            msg = (
                f"{where(files[sid][0])}: subject '{sid}' has {x.shape[1]} frames at TR {trs[sid]} s = {n_out} "
                f"frames at the model TR {model_tr} s, shorter than the window of {min_frames} frames"
            )
            if cfg.data.on_short == "error":
                raise DataError(msg + " (set 'data.on_short: skip' to skip such scans)")
            short.append(sid)
            skipped[sid] = f"too short ({n_out} < {min_frames} frames)"
            continue
        series.append(resample(x, trs[sid], model_tr, method))
        kept.append(sid)
    log_missing(cfg.site, cfg.preprocess.missing_rois, missing, len(ids), cfg.roi_names)
    censored = {sid: c for sid, c in censored.items() if sid in ids}
    if cfg.preprocess.scrub_fd is not None:
        log_censoring(cfg.site, cfg.preprocess.scrub_fd, censored)
    if short:
        log.warning(
            "site %s: skipped %d scan(s) shorter than %d frames: %s", cfg.site, len(short), min_frames, short[:5]
        )
    if not kept:
        raise DataError(
            f"{where(cfg.source)}: no usable subject (split={split}); skipped: {dict(list(skipped.items())[:5])}"
        )
    rows = {sid: i for i, sid in enumerate(parts.ids)}
    idx = np.array([rows[s] for s in kept], dtype=np.int64)
    phen = {c: parts.column(c)[idx] for c in cfg.participants.phenotypes}
    return SiteSeries(
        site=cfg.site,
        series=series,
        subject_ids=kept,
        phenotypes=phen,
        splits=assign_splits(kept, cfg, parts),
        n_rois=cfg.n_rois,
        tr=float(model_tr),
        source=cfg.source,
        files=[tuple(files[s]) for s in kept],
        skipped=skipped,
        censored=censored,
        missing=missing,
    )


def _censor_subject(cfg: SiteConfig, sid: str, x: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Subject `sid`'s series cut to its longest uncensored stretch, with the counts (`sites.scrub.censor`).
    FD from `preprocess.fd_file`, else the confounds TSV; NIfTI: the first `drop_initial` FD values are
    of frames `prepare` already dropped."""
    pp = cfg.preprocess
    key, pattern = ("preprocess.fd_file", pp.fd_file) if pp.fd_file else ("data.confounds", cfg.data.confounds)
    path = find_subject_file(cfg.data.root, pattern, sid, key, cfg.source, cfg.participants.runs)
    if path is None:
        raise DataError(
            f"{where(cfg.source, key)}: no framewise-displacement file for subject '{sid}': expected "
            f"'{cfg.data.root / fill(pattern, sid)}' (needed by preprocess.scrub_fd)"
        )
    fd = read_fd(path, pp.fd_column)
    if cfg.data.format == "nifti":
        fd = fd[pp.drop_initial :]
    return censor(x, fd, pp.scrub_fd, path, sid)


@dataclass(frozen=True)
class Cohort:
    """The subjects a model trains on: float32 (R, L_i) series at the model TR, scaled as asked."""

    series: list[np.ndarray]
    subject_ids: list[str]
    source: str  # the site YAML or the folder the series came from
    scaling: RobustScaling | PerScanScaling | None  # fitted on these series (None: `scaling="none"`)


def load_cohort(
    source: SiteConfig | str | Path,
    model_tr: float = DEFAULT_MODEL_TR,
    split: str | None = "train",
    min_frames: int | None = None,
    scaling: Scaling = "robust",
    for_model: bool = True,
) -> Cohort:
    """A site's `split` subjects (None: all), or every `.npy` of a folder (already at the model TR), scaled.

    `scaling="robust"`: (x - median_r) / IQR_r of the subjects' ROI time-means (the reference's recipe),
    refused for series that look already demeaned (it would blow them up by orders of magnitude);
    `"values"`: median / IQR of the values themselves (any preprocessing); `"none"`: as they are. The
    scaled data's typical spread is logged, with a warning when it is far from 1 (`check_spread`).
    """
    if isinstance(source, SiteConfig):
        site = load_site_series(source, model_tr, split=split, min_frames=min_frames)
        series, ids, name = site.series, site.subject_ids, str(source.source)
    else:
        series, ids = read_roi_dir(source)
        name = str(source)
    fitted = fit_method(series, scaling, name)
    if fitted is not None:
        series = fitted.apply_all(series)
    if for_model:  # what a model will see: its scale is checked and reported
        check_spread(series, name, scaling)
    return Cohort(series, ids, name, fitted)
