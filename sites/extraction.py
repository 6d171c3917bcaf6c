"""One subject's extraction: a 4D BOLD image -> float32 (R, L) ROI series with nilearn, checked.

`load_atlases` reads and checks the site's label atlases once; `extract_subject` runs one `SubjectJob`
(find the TR and check it against the config's, check 4D / orientation / overlap with the atlases /
same-grid affines, mean signal per label with
`NiftiLabelsMasker`, optional cleaning, QC) and writes the subject's `.npy`. `sites.prepare` runs the
jobs of a whole site and keeps the manifest.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainjepa.errors import ConfigError, DataError, InputError, where
from sites.config import SiteConfig
from sites.manifest import file_sha256
from sites.missing import find_missing
from sites.roi_io import write_roi_npy
from sites.scrub import keep_mask, longest_run, read_fd

log = logging.getLogger(__name__)


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
    missing_rois: str = "error"  # preprocess.missing_rois: anything but `error` records missing ROIs, writes the scan
    scrub_fd: float | None = None  # preprocess.scrub_fd: censoring through nilearn's sample_mask (FD from confounds)
    fd_column: str = "framewise_displacement"
    min_coverage: float = 0.0  # preprocess.min_coverage: a ROI with fewer of its voxels in the data is missing


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
            raise DataError(f"{where(b.atlas)}: a label atlas must be a 3D image, got shape {data.shape} ({key})")
        if not np.allclose(data, np.round(data)):
            raise DataError(f"{where(b.atlas)}: a label atlas must hold integer labels, got non-integer values ({key})")
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


# an affine whose translation (mm) / linear part differs from the atlas's by less than this is the same grid
GRID_ATOL_MM = 1e-3
GRID_ATOL_LINEAR = 1e-4
# a header TR equal to this, when the site config gives one, is taken as a "not set" placeholder
PLACEHOLDER_TR = 1.0


def _choose_tr(declared: float | None, header: float | None, bold: Path, notes: list[str]) -> float:
    """The site config's `tr` must agree with the header's (1 %); it fills in a missing/placeholder header."""
    if declared is None:
        if header is None:
            raise DataError(
                f"{where(bold)}: no repetition time in the header (pixdim[4] is 0): set 'tr' in the site config"
            )
        return header
    if header is None or abs(header - PLACEHOLDER_TR) < 1e-6:
        what = "no repetition time" if header is None else f"a placeholder TR of {header} s"
        notes.append(f"{bold}: header has {what}: using the site config's tr={declared} s")
        return declared
    if abs(header - declared) > 0.01 * header:
        raise DataError(
            f"{where(bold)}: the site config's tr={declared} s differs from the header's TR of {header} s "
            "by more than 1 %: fix 'tr' in the site config (or set it to null to use the header) or fix the header"
        )
    return declared


def _voxel_size(aff: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(aff)[:3, :3] ** 2).sum(axis=0))


def _grid_difference(bold: Path, img, a: AtlasSpec, atlas) -> str:
    """'' when the BOLD image and atlas share one voxel grid; what differs when the grids are genuinely
    different (the atlas is then resampled). Raises when only the affine differs (misaligned headers)."""
    b_aff, a_aff = np.asarray(img.affine, float), np.asarray(atlas.affine, float)
    b_vox, a_vox = _voxel_size(b_aff), _voxel_size(a_aff)
    same_shape = tuple(atlas.shape[:3]) == tuple(img.shape[:3])
    same_vox = bool(np.allclose(b_vox, a_vox, rtol=0, atol=GRID_ATOL_LINEAR))
    shift = b_aff[:3, 3] - a_aff[:3, 3]
    lin = float(np.abs(b_aff[:3, :3] - a_aff[:3, :3]).max())
    same_aff = bool(np.abs(shift).max() <= GRID_ATOL_MM and lin <= GRID_ATOL_LINEAR)
    if same_aff and same_shape:
        return ""
    if same_shape and same_vox:
        t = ", ".join(f"{v:.1f}" for v in shift)
        extra = f" and a linear part differing by up to {lin:.4g}" if lin > GRID_ATOL_LINEAR else ""
        raise DataError(
            f"{where(bold)}: BOLD affine differs from atlas '{a.name}' ({a.file}) by a translation of ({t}) mm{extra} "
            "with the same grid shape and voxel size: the images are not aligned; fix the header or resample the image"
        )
    parts = []
    if not same_shape:
        parts.append(f"shape {tuple(img.shape[:3])} vs atlas {tuple(atlas.shape[:3])}")
    if not same_vox:
        parts.append(
            f"voxel size {tuple(np.round(b_vox, 3).tolist())} vs atlas {tuple(np.round(a_vox, 3).tolist())} mm"
        )
    if not same_aff:
        parts.append("affine differs")
    return "; ".join(parts)


def atlas_overlaps(atlases: tuple[AtlasSpec, ...]) -> dict[str, int]:
    """Voxels claimed (by one of its listed labels) by two atlas blocks, per pair `'<a>+<b>'` with a count
    > 0; counted on the first atlas's grid (others resampled there, nearest neighbour, when they differ)."""
    import nibabel as nib

    if len(atlases) < 2:
        return {}
    ref = nib.load(atlases[0].file)
    masks = []
    for a in atlases:
        img = nib.load(a.file)
        if img.shape[:3] != ref.shape[:3] or not np.allclose(img.affine, ref.affine, atol=GRID_ATOL_MM):
            from nilearn.image import resample_to_img

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = resample_to_img(img, ref, interpolation="nearest")
        data = np.round(np.asanyarray(img.dataobj)).astype(np.int64).reshape(ref.shape[:3])
        masks.append(np.isin(data, a.labels))
    out = {}
    for i in range(len(atlases)):
        for j in range(i + 1, len(atlases)):
            n = int(np.count_nonzero(masks[i] & masks[j]))
            if n:
                out[f"{atlases[i].name}+{atlases[j].name}"] = n
    return out


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
    tr = _choose_tr(job.tr, _header_tr(img, job.bold), job.bold, notes)
    data_codes = nib.aff2axcodes(img.affine)
    arr = np.asarray(img.dataobj, dtype=np.float32)  # (X, Y, Z, L) read once
    finite = np.isfinite(arr)
    if not finite.all():  # nilearn would silently zero them
        frames = np.flatnonzero(~finite.all(axis=(0, 1, 2)))
        raise DataError(
            f"{where(job.bold)}: {int((~finite).sum())} NaN or Inf voxel value(s) in frame(s) {frames[:10].tolist()}"
        )
    img = nib.Nifti1Image(arr, img.affine, img.header)
    conf = _read_confounds(job.confounds, job.confound_columns, n_frames) if job.confounds is not None else None
    if job.drop_initial >= n_frames:
        raise DataError(
            f"{where(job.bold)}: has {n_frames} frames, all dropped by preprocess.drop_initial={job.drop_initial}"
        )
    keep, censoring, stretch = _sample_mask(job, n_frames)  # (L_kept,) frame indices for nilearn, or None
    blocks, empty, resampled, coverage = [], [], [], []
    covered = (arr != 0).any(axis=3)  # (X, Y, Z) voxels inside the field of view / brain mask
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
        grid = _grid_difference(job.bold, img, a, atlas)
        if grid:
            resampled.append(a.name)
            notes.append(
                f"atlas '{a.file}' grid differs from data '{job.bold}' ({grid}): atlas resampled (nearest) to the data"
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
            warnings.simplefilter("ignore")  # nilearn's resampling / empty-label warnings: reported as QC instead
            sig = masker.fit_transform(img, confounds=conf, sample_mask=keep)  # (L', n_present)
        col_of = {int(v): k for k, v in masker.region_ids_.items() if k != "background"}
        block = np.zeros((len(a.labels), sig.shape[0]), dtype=np.float32)  # (R_block, L')
        for r, lab in enumerate(a.labels):  # small loop over labels, not over samples
            if lab in col_of:
                block[r] = sig[:, col_of[lab]]
            else:
                empty.append(f"{a.name}:{lab}")
        blocks.append(block)
        coverage.append(_coverage(_labels_on_grid(atlas, img), covered, a.labels))
    x = np.concatenate(blocks, axis=0)  # (R, L)
    cov = np.concatenate(coverage)  # (R,) share of each ROI's voxels holding data
    if job.min_coverage > 0:
        x[cov < job.min_coverage] = 0.0  # too little of the ROI in the data: missing (all zero)
    x = x[:, stretch]  # nilearn cleaned every kept frame; a window must not span a censored gap
    nan_rois = np.flatnonzero(~np.isfinite(x).all(axis=1)).tolist()
    const_rois = np.flatnonzero(np.ptp(np.nan_to_num(x), axis=1) == 0).tolist()
    miss = find_missing(x)
    qc = {
        "empty_labels": empty,
        "nan_rois": nan_rois,
        "constant_rois": const_rois,
        "missing_rois": np.flatnonzero(miss).tolist(),
        "coverage_min": round(float(cov.min()), 4),
        "partial_coverage_rois": np.flatnonzero((cov > 0) & (cov < 0.95)).tolist(),  # cut by the FOV / mask
        "frames_lost": int(n_frames - x.shape[1]),
        "resampled_atlases": resampled,
    }
    if censoring is not None:
        qc["censoring"] = censoring
    if miss.any() and job.missing_rois == "error":
        raise DataError(
            f"{where(job.bold)}: QC failed: empty atlas labels {empty[:10]}, NaN ROIs {nan_rois[:10]}, "
            f"constant/all-zero ROIs {const_rois[:10]} (0-based): check the brain coverage and the atlas space, or "
            "set 'preprocess.missing_rois: mask' (keep the scan without those ROIs) or 'skip_scan'"
        )
    return x, {"tr": tr, "frames": int(x.shape[1]), "frames_in_image": int(n_frames), "qc": qc}, notes


def _labels_on_grid(atlas, img) -> np.ndarray:
    """The atlas's label at each voxel centre of the data grid (nearest neighbour; 0 outside) -> (X, Y, Z).
    (nilearn's `region_atlas_` is no use here: 0.13 stores it as int8, wrapping labels such as AAL's 7001.)"""
    a = np.rint(np.asarray(atlas.dataobj)).astype(np.int64)  # (X', Y', Z')
    shape = img.shape[:3]
    ijk = np.indices(shape).reshape(3, -1)  # (3, V) data voxels
    m = np.linalg.inv(atlas.affine) @ img.affine  # data voxel -> atlas voxel
    src = np.rint(m[:3, :3] @ ijk + m[:3, 3:]).astype(np.int64)  # (3, V)
    ok = ((src >= 0) & (src < np.array(a.shape[:3])[:, None])).all(axis=0)  # (V,)
    out = np.zeros(ijk.shape[1], dtype=np.int64)
    out[ok] = a[src[0, ok], src[1, ok], src[2, ok]]
    return out.reshape(shape)


def _coverage(labels_img: np.ndarray, covered: np.ndarray, labels: tuple[int, ...]) -> np.ndarray:
    """(R_block,) share of each label's voxels (on the data grid) where the BOLD image is not all zero."""
    lab = labels_img.ravel()  # (V,)
    lab = np.where(lab < 0, 0, lab)
    total = np.bincount(lab, minlength=max(labels) + 1).astype(np.float64)
    inside = np.bincount(lab, weights=covered.ravel().astype(np.float64), minlength=max(labels) + 1)
    want = np.asarray(labels, dtype=np.int64)
    return np.where(total[want] > 0, inside[want] / np.maximum(total[want], 1), 0.0)


def _sample_mask(job: SubjectJob, n_frames: int) -> tuple[np.ndarray | None, dict | None, slice]:
    """nilearn's `sample_mask` (frame indices kept: after `drop_initial`, and with `scrub_fd` the frames whose
    FD from the confounds file is <= the threshold) and the censoring counts. The cleaned kept frames are
    then cut to their longest contiguous stretch (`sites.scrub`'s rule: a window never spans a gap)."""
    keep = np.arange(n_frames) >= job.drop_initial  # (L,)
    if job.scrub_fd is None or job.confounds is None:
        return (np.flatnonzero(keep) if job.drop_initial else None), None, slice(None)
    fd = read_fd(job.confounds, job.fd_column)
    if fd.shape[0] != n_frames:
        raise DataError(f"{where(job.confounds, job.fd_column)}: {fd.shape[0]} FD values for {n_frames} frames")
    uncensored = keep_mask(fd, job.scrub_fd)  # (L,)
    keep &= uncensored
    if not keep.any():
        raise DataError(f"{where(job.bold)}: every frame is censored (FD > {job.scrub_fd} mm) or dropped")
    start, stop = longest_run(keep)
    first = int(keep[:start].sum())  # the stretch's position among the kept frames
    counts = {
        "frames": int(n_frames - job.drop_initial),
        "censored": int((~uncensored[job.drop_initial :]).sum()),
        "kept": int(stop - start),
        "threshold_mm": float(job.scrub_fd),
    }
    return np.flatnonzero(keep), counts, slice(first, first + stop - start)
