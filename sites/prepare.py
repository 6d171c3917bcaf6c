"""`prepare`: fMRIPrep-style 4D NIfTI -> ROI x time per subject, with a manifest.

For each subject of `participants.tsv`: find its BOLD image (and confounds TSV) by the site's
patterns, check it (4D, TR against the config's `tr`, orientation, overlap with the atlases, a
header shifted against an atlas on the same grid), extract the mean signal of every atlas label
with nilearn's `NiftiLabelsMasker` (atlas resampled to the data grid, with a warning naming what
differs, when shape or voxel size differ; optional detrending, high-pass/low-pass filtering and confound regression),
concatenate the atlases' ROIs in the declared order, QC the result and write `<subject>.npy`
(float32 (R, L), atomically) into `data.output`. A bad subject is recorded in the manifest and
skipped; site-level problems (atlas label counts, missing files with `on_missing: error`) stop
before anything is written. Missing ROIs (all-zero / constant / NaN, e.g. empty labels at the edge of the
field of view) fail the subject under `preprocess.missing_rois: error`; otherwise the scan is written
and its missing ROIs listed (per subject `qc.missing_rois`, per ROI in `qc.missing_rois.per_roi`); the
loader applies the policy. With `preprocess.scrub_fd` and FD from the confounds TSV, frames are
censored through nilearn's `sample_mask` (cleaning sees only kept frames) and the scan keeps its longest
uncensored stretch (`sites.scrub`'s rule), counted per subject (`qc.censoring`). Voxels claimed by two atlas blocks are counted per pair (manifest
`qc.atlas_overlap_voxels`, logged). Re-running skips subjects already done with the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

from brainjepa.errors import ConfigError, DataError, where
from sites.config import SiteConfig
from sites.extraction import AtlasSpec, SubjectJob, atlas_overlaps, extract_subject, load_atlases
from sites.layout import discover_subjects, find_subject_file, read_site_participants
from sites.manifest import MANIFEST, write_manifest
from sites.missing import log_missing, missing_summary
from sites.scrub import log_censoring
from sites.temporal import DEFAULT_MODEL_TR, n_frames_after

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


def _job_key(cfg: SiteConfig, atlases: tuple[AtlasSpec, ...], bold: Path, confounds: Path | None) -> str:
    p = cfg.preprocess
    blob = json.dumps(
        {
            "atlases": [(a.name, a.sha256, a.labels) for a in atlases],
            "bold": str(bold),
            "bold_mtime": bold.stat().st_mtime_ns,
            "confounds": str(confounds),
            "tr": cfg.tr,
            "preprocess": [
                p.detrend,
                p.high_pass,
                p.low_pass,
                list(p.confound_columns),
                p.drop_initial,
                p.missing_rois,
                _prepare_scrub(cfg),
                p.fd_column,
                p.min_coverage,
            ],
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_existing(out_dir: Path) -> dict:
    path = out_dir / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text()).get("subjects", {})
    except json.JSONDecodeError:
        log.warning("existing manifest %s is unreadable: all subjects will be redone", path)
        return {}


def prepare_site(
    cfg: SiteConfig,
    force: bool = False,
    n_jobs: int | None = None,
    progress: bool = True,
    min_frames: int | None = None,
    model_tr: float = DEFAULT_MODEL_TR,
) -> dict:
    """Extract every subject's ROI series; returns the manifest (also written to `data.output`).

    With `min_frames` (the model window T), scans with fewer frames at `model_tr` are counted in the
    manifest (`too_short`, per subject `qc.too_short`); loading then rejects or skips them per
    `data.on_short`.
    """
    if cfg.data.format != "nifti":
        raise ConfigError(
            f"{where(cfg.source, 'data.format')}: `prepare` needs format 'nifti', got '{cfg.data.format}' (ROI series are read directly)"
        )
    parts = read_site_participants(cfg)  # participants.runs: one row per run file
    atlases = load_atlases(cfg)
    overlaps = atlas_overlaps(atlases)
    if overlaps:
        log.warning(
            "prepare %s: voxel(s) claimed by two atlas blocks (counted in both ROIs), per pair: %s", cfg.site, overlaps
        )
    root, out_dir = cfg.data.root, cfg.output_dir
    runs = cfg.participants.runs
    bolds = {sid: find_subject_file(root, cfg.data.bold, sid, "data.bold", cfg.source, runs) for sid in parts.ids}
    missing = [sid for sid, p in bolds.items() if p is None]
    known = set(parts.ids) | (set(parts.column(cfg.participants.id_column)) if runs else set())
    orphans = sorted(set(discover_subjects(root, cfg.data.bold)) - known)
    if (missing or orphans) and cfg.data.on_missing == "error":
        msg = []
        if missing:
            msg.append(
                f"participants row(s) without a BOLD file matching '{cfg.data.bold}' under '{root}': {missing[:5]}"
            )
        if orphans:
            msg.append(f"BOLD file(s) whose subject has no row in '{parts.source}': {orphans[:5]}")
        raise DataError(
            f"{where(cfg.source, 'data.bold')}: " + "; ".join(msg) + " (set 'data.on_missing: skip' to skip them)"
        )
    existing = {} if force else _read_existing(out_dir)
    subjects: dict[str, dict] = {}
    jobs: list[SubjectJob] = []
    for sid in parts.ids:
        bold = bolds[sid]
        if bold is None:
            subjects[sid] = {"status": "failed", "error": f"no BOLD file matching '{cfg.data.bold}'"}
            continue
        conf = None
        if cfg.data.confounds is not None:
            conf = find_subject_file(root, cfg.data.confounds, sid, "data.confounds", cfg.source, runs)
            if conf is None:
                subjects[sid] = {
                    "status": "failed",
                    "bold": str(bold),
                    "error": f"no confounds file matching '{cfg.data.confounds}'",
                }
                continue
        key = _job_key(cfg, atlases, bold, conf)
        old = existing.get(sid, {})
        if old.get("status") == "ok" and old.get("key") == key and (out_dir / old.get("file", "")).is_file():
            subjects[sid] = old  # done before with the same inputs
            continue
        p = cfg.preprocess
        jobs.append(
            SubjectJob(
                sid,
                bold,
                conf,
                atlases,
                out_dir / f"{sid}.npy",
                cfg.tr,
                p.detrend,
                p.high_pass,
                p.low_pass,
                p.confound_columns,
                p.drop_initial,
                key,
                p.missing_rois,
                _prepare_scrub(cfg),
                p.fd_column,
                p.min_coverage,
            )
        )
    manifest = {
        "version": MANIFEST_VERSION,
        "site": cfg.site,
        "config": str(cfg.source),
        "roi_order": cfg.roi_names,
        "n_rois": cfg.n_rois,
        "atlases": [{**asdict(a), "file": str(a.file), "labels": list(a.labels)} for a in atlases],
        "preprocess": asdict(cfg.preprocess),
        "qc": {"atlas_overlap_voxels": overlaps},
        "unlisted_bold_files": orphans,
        "subjects": subjects,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    n_done = len([s for s in subjects.values() if s.get("status") == "ok"])
    log.info("prepare %s: %d subject(s) to extract, %d already done", cfg.site, len(jobs), n_done)
    for sid, (entry, notes) in _run(jobs, n_jobs or cfg.preprocess.n_jobs, progress, cfg.site):
        for n in notes:
            log.warning(n)
        if entry["status"] != "ok":
            log.warning("prepare %s: subject '%s' skipped: %s", cfg.site, sid, entry["error"])
        subjects[sid] = entry
        write_manifest(out_dir, manifest)  # progress survives a crash
    manifest["subjects"] = {sid: subjects[sid] for sid in parts.ids if sid in subjects}
    short = []
    for sid, e in manifest["subjects"].items():
        if e.get("status") == "ok":
            n = n_frames_after(e["frames"], float(cfg.tr or e["tr"]), model_tr)
            e["qc"]["frames_at_model_tr"] = n
            e["qc"]["too_short"] = bool(min_frames is not None and n < min_frames)
            if e["qc"]["too_short"]:
                short.append(sid)
    if short:
        log.warning(
            "prepare %s: %d scan(s) shorter than %s frames at TR %s s: %s",
            cfg.site,
            len(short),
            min_frames,
            model_tr,
            short[:5],
        )
    ok = {sid: e for sid, e in manifest["subjects"].items() if e.get("status") == "ok"}
    per_scan = {sid: e["qc"]["missing_rois"] for sid, e in ok.items() if e["qc"].get("missing_rois")}
    manifest["qc"]["missing_rois"] = {
        "policy": cfg.preprocess.missing_rois,
        **missing_summary(per_scan, cfg.roi_names, len(ok)),
    }
    log_missing(cfg.site, cfg.preprocess.missing_rois, per_scan, len(ok), cfg.roi_names)
    censoring = {sid: e["qc"]["censoring"] for sid, e in ok.items() if "censoring" in e["qc"]}
    if censoring:
        log_censoring(cfg.site, cfg.preprocess.scrub_fd, censoring)
    manifest["summary"] = {
        "ok": sum(s["status"] == "ok" for s in subjects.values()),
        "failed": sum(s["status"] != "ok" for s in subjects.values()),
        "frames_lost": sum(s.get("qc", {}).get("frames_lost", 0) for s in subjects.values()),
        "too_short": len(short),
        "scans_with_missing_rois": len(per_scan),
        "frames_censored": sum(c["censored"] for c in censoring.values()),
        "scans_with_partial_coverage": sum(bool(e["qc"].get("partial_coverage_rois")) for e in ok.values()),
        "model_tr": model_tr,
        "min_frames": min_frames,
    }
    write_manifest(out_dir, manifest)
    return manifest


def _prepare_scrub(cfg: SiteConfig) -> float | None:
    """The FD threshold `prepare` censors with (nilearn's sample_mask): when FD comes from the confounds
    file; with `preprocess.fd_file` the censoring happens when the series are loaded (`sites.cohort`)."""
    p = cfg.preprocess
    return p.scrub_fd if p.scrub_fd is not None and p.fd_file is None and cfg.data.confounds else None


def _run(jobs: list[SubjectJob], n_jobs: int, progress: bool, site: str):
    """Yield (subject, result) as subjects finish; in parallel processes when n_jobs > 1."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=f"prepare {site}", unit="subject", disable=not progress or not jobs)
    if n_jobs <= 1 or len(jobs) <= 1:
        results = ((j.subject, extract_subject(j)) for j in jobs)
    else:
        from joblib import Parallel, delayed

        par = Parallel(n_jobs=n_jobs, return_as="generator_unordered")
        results = par(delayed(_tagged)(j) for j in jobs)
    for item in results:
        bar.update(1)
        yield item
    bar.close()


def _tagged(job: SubjectJob) -> tuple[str, tuple[dict, list[str]]]:
    return job.subject, extract_subject(job)
