"""Brain gradients: the per-ROI coordinates that position every token in space.

A gradient file is an R x k matrix (ROIs in rows, in the data's ROI order; k components in
columns), stored as `.npy` or as a headerless `.csv`. Every site and the server must use the same
file; its checksum travels with checkpoints and federated rounds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from brainjepa.errors import DataError
from sites.cohort import load_cohort
from sites.config import SiteConfig


def load_gradients(path: str | Path, n_rois: int | None = None, n_components: int | None = None) -> np.ndarray:
    """Read an R x k gradient file and check it against the data (R) and the model (k).

    Returns float32 (R, k). Extra columns beyond `n_components` are dropped (the first k are used,
    as the reference does); fewer columns than `n_components` is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"gradient file '{path}' does not exist")
    if path.suffix == ".npy":
        try:
            g = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:  # pickled objects (refused), truncated or not a .npy file
            raise DataError(f"gradient file '{path}': not a readable numeric .npy matrix ({e})") from e
    elif path.suffix == ".csv":
        try:
            g = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
        except ValueError as e:
            raise DataError(f"gradient file '{path}' is not a headerless numeric CSV (R rows x k columns): {e}") from e
    else:
        raise DataError(f"gradient file '{path}': expected a .npy or .csv file, got suffix '{path.suffix}'")
    if g.ndim != 2:
        raise DataError(f"gradient file '{path}': expected a 2-D matrix (ROIs x components), got shape {g.shape}")
    if not np.isfinite(g).all():
        raise DataError(f"gradient file '{path}': contains NaN or Inf values")
    if n_rois is not None and g.shape[0] != n_rois:
        raise DataError(f"gradient file '{path}': has {g.shape[0]} rows (ROIs) but the data has {n_rois} ROIs")
    if n_components is not None:
        if g.shape[1] < n_components:
            raise DataError(
                f"gradient file '{path}': has {g.shape[1]} columns (components) but the model config "
                f"'model.gradient_components' asks for {n_components}"
            )
        g = g[:, :n_components]
    return np.ascontiguousarray(g, dtype=np.float32)


def group_connectivity(series: np.ndarray) -> np.ndarray:
    """Mean Fisher-z functional connectivity of a cohort: (N, R, T) -> (R, R), diagonal zero. Missing ROIs
    (NaN rows, `sites.missing`): pairwise-complete, each pair averaged over the scans holding both."""
    x = series - series.mean(axis=-1, keepdims=True)  # (N, R, T)
    x = x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)
    r = np.einsum("nrt,nst->nrs", x, x)  # (N, R, R) Pearson r
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))  # (N, R, R)
    ok = np.isfinite(z)
    if ok.all():
        z = z.mean(axis=0)  # (R, R)
    else:
        pairs = ok.sum(axis=0)  # (R, R) scans per pair
        if (pairs == 0).any():
            raise DataError(
                f"group connectivity: {int((pairs == 0).sum())} ROI pair(s) have no scan with both "
                "ROIs present (missing ROIs): no pairwise-complete FC for them"
            )
        z = np.where(ok, z, 0.0).sum(axis=0) / pairs
    np.fill_diagonal(z, 0.0)
    return z


def compute_gradients(fc: np.ndarray, n_components: int = 30, seed: int = 0) -> np.ndarray:
    """Diffusion-map gradients of a connectivity matrix with BrainSpace (normalized-angle kernel).

    Returns float32 (R, n_components). BrainSpace's default sparsity (top 10 % per row) is used.
    """
    from brainspace.gradient import GradientMaps  # heavy import (vtk): only when needed

    fc = np.asarray(fc, dtype=np.float64)
    if fc.ndim != 2 or fc.shape[0] != fc.shape[1]:
        raise DataError(f"connectivity matrix: expected square R x R, got shape {fc.shape}")
    if n_components >= fc.shape[0]:
        raise DataError(
            f"connectivity matrix has {fc.shape[0]} ROIs: cannot compute {n_components} gradient components"
        )
    gm = GradientMaps(n_components=n_components, approach="dm", kernel="normalized_angle", random_state=seed)
    gm.fit(fc)
    return np.ascontiguousarray(gm.gradients_, dtype=np.float32)


def gradient_checksum(g: np.ndarray) -> str:
    """SHA-256 of the float32 gradient matrix (shape included): identifies a gradient file's content."""
    g = np.ascontiguousarray(g, dtype=np.float32)
    h = hashlib.sha256(str(g.shape).encode())
    h.update(g.tobytes())
    return h.hexdigest()


def save_gradients(path: str | Path, g: np.ndarray) -> Path:
    """Write an R x k gradient matrix as .npy or headerless .csv (by suffix), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(g, dtype=np.float32))
    elif path.suffix == ".csv":
        np.savetxt(tmp, np.asarray(g, dtype=np.float64), delimiter=",")
    else:
        raise DataError(f"gradient file '{path}': expected suffix .npy or .csv")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------
# Alignment, connectivity sources, metadata, plots
# --------------------------------------------------------------------------------------------------

GRADIENT_METHOD = {"approach": "dm", "kernel": "normalized_angle", "sparsity": 0.9, "library": "brainspace"}


def align_gradients(g: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Procrustes-rotate (R, k) gradients onto a reference (R, k') set (BrainSpace `procrustes`).

    Only rotations/reflections among the components are applied (no centring, no scaling), so the
    result is still a valid diffusion-map embedding. With k != k' the common first min(k, k')
    components are aligned and any extra ones are kept as they are.
    """
    from brainspace.gradient.alignment import procrustes

    g = np.asarray(g, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if g.shape[0] != ref.shape[0]:
        raise DataError(f"gradient alignment: {g.shape[0]} ROIs vs {ref.shape[0]} in the reference set")
    k = min(g.shape[1], ref.shape[1])
    out = g.copy()
    out[:, :k] = procrustes(g[:, :k], ref[:, :k])
    return np.ascontiguousarray(out, dtype=np.float32)


def fisher_z_fc(x: np.ndarray) -> np.ndarray:
    """Fisher-z FC of one subject: (R, L) -> (R, R) float64, diagonal zero; a missing ROI (a NaN row,
    `sites.missing`) gives NaN in its row and column."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
    z = np.arctanh(np.clip(x @ x.T, -0.999999, 0.999999))  # (R, R)
    np.fill_diagonal(z, 0.0)
    return z


def site_fc_sum(series: list[np.ndarray]) -> tuple[np.ndarray, int | np.ndarray]:
    """What a site contributes to a federation's connectivity: (sum of Fisher-z FC (R, R), subject count).

    Series may differ in length (N x (R, L_i)); no raw series leave the site, only this sum. With missing
    ROIs (NaN rows) the statistics are pairwise-complete: a pair's sum runs over the scans where both ROIs
    are present, and the count is then an (R, R) int64 array of those scans per pair.
    """
    if not series:
        raise DataError("site FC: no series")
    r = {s.shape[0] for s in series}
    if len(r) != 1:
        raise DataError(f"site FC: series have different ROI counts {sorted(r)}")
    n = r.pop()
    total = np.zeros((n, n))
    pairs = np.zeros((n, n), dtype=np.int64)
    for s in series:  # one (R, R) product per subject, not a hot path
        z = fisher_z_fc(s)
        ok = np.isfinite(z)
        total += np.where(ok, z, 0.0)
        pairs += ok
    return (total, len(series)) if (pairs == len(series)).all() else (total, pairs)


def site_contribution(site: SiteConfig, model_tr: float, split: str | None = "train") -> tuple[np.ndarray, int]:
    """`site_fc_sum` of a site's `split` subjects (None: all) at the model TR: what it shares for gradients."""
    return site_fc_sum(load_cohort(site, model_tr, split=split, scaling="none", for_model=False).series)


def federated_fc(contributions: list[tuple[np.ndarray, int | np.ndarray]]) -> np.ndarray:
    """Mean Fisher-z FC of a federation from the sites' (sum, count) pairs -> (R, R); a count may be an
    (R, R) array of scans per pair (pairwise-complete, `site_fc_sum` with missing ROIs)."""
    if not contributions:
        raise DataError("federated FC: no site contributions")
    shapes = {np.asarray(s).shape for s, _ in contributions}
    if len(shapes) != 1:
        raise DataError(f"federated FC: sites sent FC sums of different shapes {sorted(shapes)}: ROI-count mismatch")
    n = sum(fc_count(c) for _, c in contributions)  # int, or (R, R) scans per pair
    if np.max(n) <= 0:
        raise DataError("federated FC: no subjects in any site")
    if np.min(n) <= 0:
        bad = np.argwhere(np.asarray(n) <= 0)[0]
        raise DataError(
            f"federated FC: {int(np.sum(np.asarray(n) <= 0))} ROI pair(s) (e.g. {bad.tolist()}) have "
            "no scan with both ROIs present (missing ROIs): no pairwise-complete FC for them"
        )
    return sum(np.asarray(s, dtype=np.float64) for s, _ in contributions) / n


def fc_count(count: object) -> int | np.ndarray:
    """A contribution's count as an int (every ROI in every scan) or an (R, R) int64 array per pair."""
    c = np.asarray(count)
    return int(c) if c.ndim == 0 else c.astype(np.int64)


def n_scans(contributions: list[tuple[np.ndarray, int | np.ndarray]]) -> int:
    """Scans behind FC contributions (with pair counts: the most any pair has)."""
    return int(sum(np.max(fc_count(c)) for _, c in contributions))


def load_connectivity(path: str | Path) -> np.ndarray:
    """A square connectivity matrix from .npy or headerless .csv -> float64 (R, R)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"connectivity file '{path}' does not exist")
    if path.suffix == ".npy":
        fc = np.load(path, allow_pickle=False)
    else:
        try:
            fc = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None, dtype=np.float64, ndmin=2)
        except ValueError as e:
            raise DataError(f"connectivity file '{path}': not a numeric matrix: {e}") from e
    fc = np.asarray(fc, dtype=np.float64)
    if fc.ndim != 2 or fc.shape[0] != fc.shape[1]:
        raise DataError(f"connectivity file '{path}': expected a square R x R matrix, got shape {fc.shape}")
    if not np.isfinite(fc).all():
        raise DataError(f"connectivity file '{path}': contains NaN or Inf values")
    return fc


def schaefer400_fc(group: str = "main") -> np.ndarray:
    """BrainSpace's shipped HCP group FC for Schaefer-400 (`main` or `holdout`) -> (400, 400)."""
    from sites.connectome import schaefer_fc

    return schaefer_fc(400, group)


def gradient_metadata(g: np.ndarray, source: str, **params: object) -> dict:
    """The sidecar record of a gradient file: source, method, parameters, shape and checksum."""
    return {
        "kind": "brain_gradients",
        "source": source,
        "method": GRADIENT_METHOD,
        "n_rois": int(g.shape[0]),
        "n_components": int(g.shape[1]),
        "checksum": gradient_checksum(g),
        "params": params,
    }


def save_gradients_with_metadata(path: str | Path, g: np.ndarray, metadata: dict) -> tuple[Path, Path]:
    """Write the gradient file and `<file>.json` beside it (both atomically); the checksum is recomputed."""
    import json

    path = save_gradients(path, g)
    g_saved = load_gradients(path)  # what readers will see (CSV rounds through float64 text)
    meta = {**metadata, "checksum": gradient_checksum(g_saved), "file": path.name}
    side = path.with_name(path.name + ".json")
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=str))
    tmp.replace(side)
    return path, side


def gradients_for(path: str, series: list[np.ndarray], n_components: int, source: str) -> tuple[np.ndarray, str]:
    """A run's gradient matrix (R, k) and where it came from: the file at `path`, or (`path` empty) the
    diffusion-map gradients of the mean connectivity of up to 256 of the cohort's `series`."""
    n_rois = series[0].shape[0]
    if path:
        return load_gradients(path, n_rois, n_components), path
    n = min(len(series), 256)
    min_len = min(s.shape[1] for s in series[:n])
    fc = group_connectivity(np.stack([s[:, :min_len] for s in series[:n]]))
    return compute_gradients(fc, n_components), f"computed from {n} subjects of {source}"


def plot_gradients(g: np.ndarray, path: str | Path, networks: np.ndarray | None = None, title: str = "") -> Path:
    """Scatter of gradient 1 vs 2 (and 1 vs 3), ROIs coloured by network, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    k = g.shape[1]
    pairs = [(0, 1)] + ([(0, 2)] if k > 2 else [])
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.6), squeeze=False)
    nets = np.zeros(g.shape[0], dtype=int) if networks is None else np.asarray(networks)
    cmap = plt.get_cmap("tab10" if len(np.unique(nets)) <= 10 else "tab20")
    for ax, (i, j) in zip(axes[0], pairs, strict=True):
        for c, lab in enumerate(np.unique(nets)):
            m = nets == lab
            ax.scatter(g[m, i], g[m, j], s=10, color=cmap(c % cmap.N), label=f"network {lab}", alpha=0.8)
        ax.set_xlabel(f"gradient {i + 1}")
        ax.set_ylabel(f"gradient {j + 1}")
        ax.axhline(0, lw=0.5, color="grey")
        ax.axvline(0, lw=0.5, color="grey")
    if networks is not None:
        axes[0, -1].legend(fontsize=7, markerscale=1.5, loc="best")
    fig.suptitle(title or f"brain gradients ({g.shape[0]} ROIs)")
    fig.tight_layout()
    from brainjepa.plots import save_figure

    return save_figure(fig, path)
