"""`prepare`: fMRIPrep-style 4D NIfTI -> ROI x time per subject, with a manifest.

For each subject of `participants.tsv`: find its BOLD image (and confounds TSV) by the site's
patterns, check it (4D, TR, orientation, overlap with the atlases), extract the mean signal of every
atlas label with nilearn's `NiftiLabelsMasker` (atlas resampled to the data grid, with a warning
when grids differ; optional detrending, high-pass/low-pass filtering and confound regression),
concatenate the atlases' ROIs in the declared order, QC the result and write `<subject>.npy`
(float32 (R, L), atomically) into `data.output`. A bad subject is recorded in the manifest and
skipped; site-level problems (atlas label counts, missing files with `on_missing: error`) stop
before anything is written. Re-running skips subjects already done with the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sites.cohort import discover_subjects, find_subject_file
from sites.config import SiteConfig
from sites.errors import ConfigError, DataError, InputError, where
from sites.manifest import MANIFEST, file_sha256, write_manifest
from sites.participants import read_participants
from sites.roi_io import write_roi_npy
from sites.temporal import DEFAULT_MODEL_TR, n_frames_after

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class AtlasSpec:
    name: str
    file: Path
    labels: tuple[int, ...]  # label values, in ROI order
    sha256: str


@dataclass(frozen=True)
class SubjectJob:
    subject: str
    bold: Path
    confounds: Path | None
    atlases: tuple[AtlasSpec, ...]
    out_file: Path
    tr: float | None  # override (None: header)
    detrend: bool
    high_pass: float | None
    low_pass: float | None
    confound_columns: tuple[str, ...]
    drop_initial: int
    key: str  # hash of everything that determines the output


def load_atlases(cfg: SiteConfig) -> tuple[AtlasSpec, ...]:
    """Check every block's label image (3D, integer labels, declared count) -> AtlasSpecs."""
    import nibabel as nib

    out = []
    for i, b in enumerate(cfg.rois):
        key = f"rois[{i}].atlas"
        if b.atlas is None or not b.atlas.is_file():
            raise ConfigError(f"{where(cfg.source, key)}: atlas file '{b.atlas}' does not exist")
        try:
            img = nib.load(b.atlas)
        except (nib.filebasedimages.ImageFileError, OSError, EOFError) as e:
            raise DataError(f"{where(b.atlas)}: cannot read the atlas image ({key}): {e}") from e
        data = np.asanyarray(img.dataobj)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise DataError(
                f"{where(b.atlas)}: a label atlas must be a 3D image, got shape {data.shape} ({key})"
            )
        if not np.allclose(data, np.round(data)):
            raise DataError(
                f"{where(b.atlas)}: a label atlas must hold integer labels, got non-integer values ({key})"
            )
        present = [int(v) for v in np.unique(np.round(data).astype(np.int64)) if v != 0]
        if b.labels is not None:
            absent = sorted(set(b.labels) - set(present))
            if absent:
                raise DataError(
                    f"{where(b.atlas)}: labels {absent[:10]} listed in {key.replace('atlas', 'labels')} are not in the atlas"
                )
            labels = tuple(b.labels)
        else:
            labels = tuple(present)
        if len(labels) != b.n_rois:
            raise DataError(
                f"{where(b.atlas)}: has {len(labels)} labels but {where(cfg.source, f'rois[{i}].n_rois')} declares "
                f"{b.n_rois}: ROI-count mismatch between the atlas and the ROI layout"
            )
        out.append(AtlasSpec(b.name, b.atlas, labels, file_sha256(b.atlas)))
    return tuple(out)


def _header_tr(img, path: Path) -> float | None:
    zooms = img.header.get_zooms()
    if len(zooms) < 4 or not np.isfinite(zooms[3]) or zooms[3] <= 0:
        return None
    unit = img.header.get_xyzt_units()[1]
    tr = float(zooms[3])
    return tr / 1000.0 if unit == "msec" else tr / 1e6 if unit == "usec" else tr


def _read_confounds(path: Path, columns: tuple[str, ...], n_frames: int) -> np.ndarray:
    import pandas as pd

    try:
        df = pd.read_csv(path, sep="\t")
    except (ValueError, OSError) as e:
        raise DataError(f"{where(path)}: cannot read the confounds TSV: {e}") from e
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(
            f"{where(path, missing[0])}: confound column(s) {missing} not found (have {list(df.columns)[:8]}...)"
        )
    if len(df) != n_frames:
        raise DataError(f"{where(path)}: has {len(df)} rows but the BOLD image has {n_frames} frames")
    x = df[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)  # (L, C)
    return np.where(np.isnan(x), 0.0, x)  # fMRIPrep derivatives start with n/a


def _overlap(a_aff: np.ndarray, a_shape: tuple, b_aff: np.ndarray, b_shape: tuple) -> bool:
    def box(aff, shape):
        corners = np.array(
            [[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
        )
        w = corners @ aff.T
        return w[:, :3].min(axis=0), w[:, :3].max(axis=0)

    (alo, ahi), (blo, bhi) = box(a_aff, a_shape), box(b_aff, b_shape)
    return bool(np.all(alo <= bhi) and np.all(blo <= ahi))


def extract_subject(job: SubjectJob) -> tuple[dict, list[str]]:
    """Run one subject (in a worker process). Returns (manifest entry, warnings). Never raises for bad data."""
    entry: dict = {"status": "failed", "bold": str(job.bold), "key": job.key}
    notes: list[str] = []
    try:
        x, info, notes = _extract(job)
    except (InputError, OSError, EOFError, ValueError) as e:  # bad input: record, skip the subject
        entry["error"] = str(e)
        return entry, notes
    write_roi_npy(job.out_file, x)
    entry.update(status="ok", file=job.out_file.name, **info)
    return entry, notes


def _extract(job: SubjectJob) -> tuple[np.ndarray, dict, list[str]]:
    import nibabel as nib
    from nilearn.maskers import NiftiLabelsMasker

    notes: list[str] = []
    try:
        img = nib.load(job.bold)
    except nib.filebasedimages.ImageFileError as e:
        raise DataError(f"{where(job.bold)}: not a readable NIfTI image: {e}") from e
    if img.ndim != 4:
        raise DataError(
            f"{where(job.bold)}: expected a 4D BOLD image (x, y, z, time), got a {img.ndim}D image of shape {img.shape}"
        )
    n_frames = img.shape[3]
    tr = job.tr if job.tr is not None else _header_tr(img, job.bold)
    if tr is None:
        raise DataError(
            f"{where(job.bold)}: no repetition time in the header (pixdim[4] is 0): set 'tr' in the site config"
        )
    data_codes = nib.aff2axcodes(img.affine)
    arr = np.asarray(img.dataobj, dtype=np.float32)  # (X, Y, Z, L) read once
    finite = np.isfinite(arr)
    if not finite.all():  # nilearn would silently zero them
        frames = np.flatnonzero(~finite.all(axis=(0, 1, 2)))
        raise DataError(
            f"{where(job.bold)}: {int((~finite).sum())} NaN or Inf voxel value(s) in frame(s) {frames[:10].tolist()}"
        )
    img = nib.Nifti1Image(arr, img.affine, img.header)
    conf = (
        _read_confounds(job.confounds, job.confound_columns, n_frames) if job.confounds is not None else None
    )
    if job.drop_initial >= n_frames:
        raise DataError(
            f"{where(job.bold)}: has {n_frames} frames, all dropped by preprocess.drop_initial={job.drop_initial}"
        )
    keep = np.arange(job.drop_initial, n_frames) if job.drop_initial else None  # nilearn sample_mask
    blocks, empty, resampled = [], [], []
    for a in job.atlases:
        atlas = nib.load(a.file)
        a_codes = nib.aff2axcodes(atlas.affine)
        if a_codes != data_codes:
            raise DataError(
                f"{where(job.bold)}: orientation {''.join(data_codes)} differs from atlas '{a.file}' "
                f"({''.join(a_codes)}): reorient one of them (e.g. nibabel.as_closest_canonical) so both agree"
            )
        if not _overlap(atlas.affine, atlas.shape, img.affine, img.shape):
            raise DataError(
                f"{where(job.bold)}: does not overlap atlas '{a.file}' in world space (different template space?)"
            )
        if atlas.shape[:3] != img.shape[:3] or not np.allclose(atlas.affine, img.affine, atol=1e-4):
            resampled.append(a.name)
            notes.append(
                f"atlas '{a.file}' grid {atlas.shape[:3]} differs from data '{job.bold}' grid {img.shape[:3]}: atlas resampled (nearest) to the data"
            )
        masker = NiftiLabelsMasker(
            atlas,
            resampling_target="data",
            detrend=job.detrend,
            high_pass=job.high_pass,
            low_pass=job.low_pass,
            t_r=tr,
            standardize=False,
            strategy="mean",
        )
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # nilearn's resampling / empty-label warnings: reported as QC instead
            sig = masker.fit_transform(img, confounds=conf, sample_mask=keep)  # (L', n_present)
        col_of = {int(v): k for k, v in masker.region_ids_.items() if k != "background"}
        block = np.zeros((len(a.labels), sig.shape[0]), dtype=np.float32)  # (R_block, L')
        for r, lab in enumerate(a.labels):  # small loop over labels, not over samples
            if lab in col_of:
                block[r] = sig[:, col_of[lab]]
            else:
                empty.append(f"{a.name}:{lab}")
        blocks.append(block)
    x = np.concatenate(blocks, axis=0)  # (R, L)
    nan_rois = np.flatnonzero(~np.isfinite(x).all(axis=1)).tolist()
    const_rois = np.flatnonzero(np.ptp(np.nan_to_num(x), axis=1) == 0).tolist()
    qc = {
        "empty_labels": empty,
        "nan_rois": nan_rois,
        "constant_rois": const_rois,
        "frames_lost": int(job.drop_initial),
        "resampled_atlases": resampled,
    }
    if empty or nan_rois or const_rois:
        raise DataError(
            f"{where(job.bold)}: QC failed: empty atlas labels {empty[:10]}, NaN ROIs {nan_rois[:10]}, "
            f"constant/all-zero ROIs {const_rois[:10]} (0-based): check the brain coverage and the atlas space"
        )
    return x, {"tr": tr, "frames": int(x.shape[1]), "frames_in_image": int(n_frames), "qc": qc}, notes


def _job_key(cfg: SiteConfig, atlases: tuple[AtlasSpec, ...], bold: Path, confounds: Path | None) -> str:
    p = cfg.preprocess
    blob = json.dumps(
        {
            "atlases": [(a.name, a.sha256, a.labels) for a in atlases],
            "bold": str(bold),
            "bold_mtime": bold.stat().st_mtime_ns,
            "confounds": str(confounds),
            "tr": cfg.tr,
            "preprocess": [p.detrend, p.high_pass, p.low_pass, list(p.confound_columns), p.drop_initial],
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
    parts = read_participants(cfg.participants.file, cfg.participants.id_column, cfg.participants.phenotypes)
    atlases = load_atlases(cfg)
    root, out_dir = cfg.data.root, cfg.output_dir
    bolds = {sid: find_subject_file(root, cfg.data.bold, sid, "data.bold", cfg.source) for sid in parts.ids}
    missing = [sid for sid, p in bolds.items() if p is None]
    orphans = sorted(set(discover_subjects(root, cfg.data.bold)) - set(parts.ids))
    if (missing or orphans) and cfg.data.on_missing == "error":
        msg = []
        if missing:
            msg.append(
                f"participants row(s) without a BOLD file matching '{cfg.data.bold}' under '{root}': {missing[:5]}"
            )
        if orphans:
            msg.append(f"BOLD file(s) whose subject has no row in '{parts.source}': {orphans[:5]}")
        raise DataError(
            f"{where(cfg.source, 'data.bold')}: "
            + "; ".join(msg)
            + " (set 'data.on_missing: skip' to skip them)"
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
            conf = find_subject_file(root, cfg.data.confounds, sid, "data.confounds", cfg.source)
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
    manifest["summary"] = {
        "ok": sum(s["status"] == "ok" for s in subjects.values()),
        "failed": sum(s["status"] != "ok" for s in subjects.values()),
        "frames_lost": sum(s.get("qc", {}).get("frames_lost", 0) for s in subjects.values()),
        "too_short": len(short),
        "model_tr": model_tr,
        "min_frames": min_frames,
    }
    write_manifest(out_dir, manifest)
    return manifest


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
