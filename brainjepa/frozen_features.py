"""Frozen-backbone embeddings of scans: the features every probe of a pretrained model starts from.

The backbone is a checkpoint's EMA target encoder (`brainjepa.downstream.model.load_backbone`), or the
same `Encoder` left at its random initialisation (the baseline a probe is held against). Each scan is
cut into `windows` evenly spaced windows of the model's `n_frames` (`sites.windows.multi_windows`);
the encoder sees all tokens of each window and its outputs are averaged over the windows. Pooled
features are the mean over tokens, (N, D); `tokens=True` keeps every token, (N, R * T/p, D).

Scaling, as downstream evaluation does it: a site YAML is scaled by the site's own robust statistics
fitted on its training split (`sites.scaling.fit`); one series file by the pretraining run's saved
statistics when the checkpoint has them, else not at all (with a warning).

Outputs (each written to a temporary file and renamed): PREFIX.npy (float32), PREFIX.ids.txt (one
subject id per line, the rows' order), PREFIX.json (what was embedded and how).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from brainjepa.checkpoint import atomic_write_text
from brainjepa.config import load_site, to_dict
from brainjepa.downstream.model import Backbone, load_backbone
from brainjepa.errors import ConfigError, DataError, where
from brainjepa.jepa import resolve_device
from brainjepa.masks import mean_observed, split_missing
from brainjepa.schema import check_choices
from brainjepa.vit import Encoder
from sites.cohort import SPLITS, load_site_series
from sites.manifest import file_sha256
from sites.scaling import check_spread, fit_method, scaling_from_dict
from sites.temporal import DEFAULT_MODEL_TR
from sites.windows import multi_windows, pack

log = logging.getLogger(__name__)

SplitChoice = Literal["train", "val", "test", "all"]


@dataclass(frozen=True)
class EmbedRequest:
    """What to embed (a site YAML or one series file) with which backbone, and where to write it."""

    checkpoint: Path
    out: Path  # prefix: writes out.npy, out.ids.txt, out.json
    site: Path | None = None
    series: Path | None = None  # one (R, L) .npy already at the model TR
    series_id: str = ""  # its subject id (default: the file's stem)
    split: SplitChoice = "all"  # site input only
    tokens: bool = False
    random_init: bool = False
    seed: int = 0  # the random initialisation's seed (random_init only)
    windows: int = 4
    device: str = "cpu"
    chunk: int = 16  # scans per forward batch (each brings `windows` windows)
    progress: bool = True

    def __post_init__(self) -> None:
        check_choices(self, "embed")
        if (self.site is None) == (self.series is None):
            raise ConfigError("embed: give exactly one input, --site SITE.yaml or --series FILE.npy")
        if self.series_id and self.series is None:
            raise ConfigError("embed: --ids names the subject of --series; a site's ids come from its participants")
        if self.windows < 1 or self.chunk < 1:
            raise ConfigError(f"embed: windows and chunk must be >= 1, got {self.windows} and {self.chunk}")


@dataclass(frozen=True)
class Scans:
    """The scans to embed, scaled: N x (R, L_i) float32, with their ids and splits."""

    series: list[np.ndarray]
    ids: list[str]
    splits: list[str]
    source: str
    scaling: dict  # how they were scaled (written to PREFIX.json)


@dataclass(frozen=True)
class EmbedResult:
    features: Path
    ids: Path
    meta: Path
    shape: tuple[int, ...]
    seconds: float  # the forward passes only


def output_paths(out: Path) -> tuple[Path, Path, Path]:
    base = str(out.with_suffix("")) if out.suffix == ".npy" else str(out)
    return Path(base + ".npy"), Path(base + ".ids.txt"), Path(base + ".json")


def pretrain_data(path: Path) -> tuple[float, str]:
    """The checkpoint's pretraining `data.model_tr` and `data.scaling` (memory-mapped read: the weights
    stay on disk): sites are embedded at the same TR and scaled the same way as pretraining scaled them."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    data = (ckpt.get("config") or {}).get("data") or {}
    return float(data.get("model_tr", DEFAULT_MODEL_TR)), str(data.get("scaling", "robust"))


def build_encoder(backbone: Backbone, random_init: bool, seed: int) -> Encoder:
    """The backbone's Encoder in eval mode: pretrained weights (strict), or the random init of `seed`.
    The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Encoder(backbone.model, torch.from_numpy(backbone.gradients))
    if not random_init:
        encoder.load_state_dict(backbone.weights, strict=True)
    return encoder.eval()


def site_scans(path: Path, backbone: Backbone, model_tr: float, split: str, method: str = "robust") -> Scans:
    """A site's scans at the model TR, scaled by its own training split's statistics (`method`, as in
    pretraining: `sites.scaling.fit_method`)."""
    site, _ = load_site(path)
    n_rois, n_frames = backbone.model.n_rois, backbone.model.n_frames
    if site.n_rois != n_rois:
        raise DataError(
            f"{where(site.source)}: the site has {site.n_rois} ROIs, the checkpoint "
            f"'{backbone.source}' expects {n_rois} (its model.n_rois)"
        )
    all_series = load_site_series(site, model_tr=model_tr, min_frames=n_frames)
    fitted = fit_method(all_series.subset("train").series, method, str(site.source))
    chosen = all_series if split == "all" else all_series.subset(split)
    if len(chosen) == 0:
        raise DataError(f"{where(site.source)}: no scan in split '{split}' (splits: {list(SPLITS)})")
    if fitted is None:
        scaling: dict = {"kind": "none"}
    else:
        scaling = {
            "kind": f"site-train-{method}",
            "n_subjects": getattr(fitted, "n_subjects", 0),
            "checksum": fitted.checksum(),
        }
    splits = [str(s) for s in chosen.splits]
    source = str(Path(site.source).resolve())
    series = chosen.series if fitted is None else fitted.apply_all(chosen.series)
    check_spread(series, str(site.source), method)  # what the model sees: its scale logged, far from 1 warned
    return Scans(series, list(chosen.subject_ids), splits, source, scaling)


def series_scans(path: Path, subject_id: str, backbone: Backbone) -> Scans:
    """One (R, L) series file at the model TR, scaled by the pretraining run's statistics if saved."""
    n_rois, n_frames = backbone.model.n_rois, backbone.model.n_frames
    expected = f"an (R={n_rois}, L>={n_frames}) float array (ROIs x frames at the model TR)"
    if not path.is_file():
        raise DataError(f"series file '{path}' does not exist; expected {expected}")
    try:
        x = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DataError(f"series file '{path}': not a readable .npy array ({e}); expected {expected}") from e
    if x.ndim != 2 or x.shape[0] != n_rois or x.shape[1] < n_frames or not np.issubdtype(x.dtype, np.number):
        raise DataError(
            f"series file '{path}': expected {expected} for checkpoint '{backbone.source}', "
            f"got shape {x.shape} ({x.dtype})"
        )
    x = x.astype(np.float32)
    if backbone.scaling is not None:
        fitted = scaling_from_dict(backbone.scaling)
        x, scaling = fitted.apply(x), {"kind": "checkpoint-robust", "checksum": fitted.checksum()}
    else:
        log.warning("checkpoint '%s' saved no scaling statistics: '%s' is embedded unscaled", backbone.source, path)
        scaling = {"kind": "none"}
    check_spread([x], str(path), "checkpoint")
    return Scans([x], [subject_id or path.stem], [""], str(path.resolve()), scaling)


def embed_scans(
    encoder: Encoder,
    scans: Scans,
    windows: int,
    tokens: bool,
    out: np.ndarray,
    device: torch.device,
    chunk: int,
    progress: bool,
) -> None:
    """Fill out (N, D) (pooled) or (N, n_tokens, D) (tokens) with window-averaged features."""
    packed = pack(scans.series, scans.ids)
    n_frames, N = encoder.cfg.n_frames, len(scans.series)
    bar = tqdm(total=N, desc="embed", unit="subject", disable=not progress)
    with torch.no_grad():
        for start in range(0, N, chunk):
            idx = np.arange(start, min(start + chunk, N))
            x = torch.from_numpy(multi_windows(packed, n_frames, windows, idx))  # (n, W, R, T)
            x, observed = split_missing(x.flatten(0, 1))  # (n*W, R, T), (n*W, R): missing ROIs -> 0
            h = encoder(x.to(device))  # (n*W, n_tokens, D)
            if tokens:  # a missing ROI's tokens are NaN in the output
                keep = observed.repeat_interleave(h.shape[1] // observed.shape[1], dim=1).to(device)  # (n*W, N)
                h = torch.where(keep[..., None], h, torch.full((), float("nan"), dtype=h.dtype, device=device))
                h = h.view(len(idx), windows, *h.shape[1:]).mean(dim=1)  # (n, n_tokens, D)
            else:
                h = mean_observed(h, observed.to(device)).view(len(idx), windows, -1).mean(dim=1)  # (n, D)
            out[start : start + len(idx)] = h.float().cpu().numpy()
            bar.update(len(idx))
    bar.close()


def run_embed(req: EmbedRequest) -> EmbedResult:
    """Load the backbone and the scans, embed them, write the three outputs."""
    backbone = load_backbone(req.checkpoint)
    model = backbone.model
    if req.site is not None:
        model_tr, method = pretrain_data(req.checkpoint)
        scans = site_scans(req.site, backbone, model_tr, req.split, method)
    else:
        scans = series_scans(req.series, req.series_id, backbone)
    device = resolve_device(req.device)
    encoder = build_encoder(backbone, req.random_init, req.seed).to(device)
    N, D = len(scans.ids), model.embed_dim
    shape = (N, model.n_tokens, D) if req.tokens else (N, D)
    npy, ids_path, meta_path = output_paths(req.out)
    npy.parent.mkdir(parents=True, exist_ok=True)
    tmp = npy.with_name(f".{npy.name}.tmp-{os.getpid()}")
    done = False
    try:  # memory-mapped: token features can be larger than RAM
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        t0 = time.perf_counter()
        embed_scans(encoder, scans, req.windows, req.tokens, out, device, req.chunk, req.progress)
        seconds = time.perf_counter() - t0
        out.flush()
        del out
        os.replace(tmp, npy)
        done = True
    finally:
        if not done:
            tmp.unlink(missing_ok=True)
    atomic_write_text(ids_path, "".join(f"{s}\n" for s in scans.ids))
    meta = {
        "checkpoint": str(Path(req.checkpoint).resolve()),
        "checkpoint_sha256": file_sha256(req.checkpoint),
        "random_init": req.random_init,
        "seed": req.seed if req.random_init else None,
        "source": scans.source,
        "split": req.split if req.site is not None else None,
        "subject_splits": scans.splits if req.site is not None else None,
        "features": "tokens" if req.tokens else "mean over tokens",
        "windows": req.windows,
        "shape": list(shape),
        "dtype": "float32",
        "model": to_dict(model),
        "scaling": scans.scaling,
        "device": str(device),
        "seconds": round(seconds, 3),
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    log.info("embedded %d scan(s) in %.2f s -> %s %s", N, seconds, npy, shape)
    return EmbedResult(npy, ids_path, meta_path, shape, seconds)
