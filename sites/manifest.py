"""The `prepare` manifest: what was extracted, from what, and how well (JSON, written atomically).

Layout of `<output>/manifest.json`:
    {"version": 1, "site": ..., "roi_order": [names], "n_rois": R,
     "atlases": [{"name", "file", "sha256", "labels", "resampled"}],
     "preprocess": {...}, "qc": {"atlas_overlap_voxels": {"<block>+<block>": n_voxels}},
     "subjects": {id: {"status": "ok" | "failed", "file", "bold", "tr", "frames",
     "qc": {"empty_labels", "nan_rois", "constant_rois", "frames_lost", "resampled_atlases"}, "error"}}}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from brainjepa.errors import DataError, where

MANIFEST = "manifest.json"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(out_dir: Path, cfg_file: object = None) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{where(cfg_file, 'data.output')}: no manifest at '{path}': run `brainjepa prepare --site {cfg_file}` first"
        )
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{where(path)}: malformed manifest JSON: {e}") from e
    if not isinstance(m, dict) or "subjects" not in m:
        raise DataError(f"{where(path)}: not a prepare manifest (no 'subjects' entry)")
    return m


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False))
    tmp.replace(path)
    return path
