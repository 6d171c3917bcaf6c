"""Brain gradients: the per-ROI coordinates that position every token in space.

A gradient file is an R x k matrix (ROIs in rows, in the data's ROI order; k components in
columns), stored as `.npy` or as a headerless `.csv`. Every site and the server must use the same
file; its checksum travels with checkpoints and federated rounds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from sites.errors import DataError


def load_gradients(path: str | Path, n_rois: int | None = None, n_components: int | None = None) -> np.ndarray:
    """Read an R x k gradient file and check it against the data (R) and the model (k).

    Returns float32 (R, k). Extra columns beyond `n_components` are dropped (the first k are used,
    as the reference does); fewer columns than `n_components` is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"gradient file '{path}' does not exist")
    if path.suffix == ".npy":
        g = np.load(path, allow_pickle=False)
    elif path.suffix == ".csv":
        try:
            g = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
        except ValueError as e:
            raise DataError(
                f"gradient file '{path}' is not a headerless numeric CSV (R rows x k columns): {e}"
            ) from e
    else:
        raise DataError(f"gradient file '{path}': expected a .npy or .csv file, got suffix '{path.suffix}'")
    if g.ndim != 2:
        raise DataError(f"gradient file '{path}': expected a 2-D matrix (ROIs x components), got shape {g.shape}")
    if not np.isfinite(g).all():
        raise DataError(f"gradient file '{path}': contains NaN or Inf values")
    if n_rois is not None and g.shape[0] != n_rois:
        raise DataError(
            f"gradient file '{path}': has {g.shape[0]} rows (ROIs) but the data has {n_rois} ROIs"
        )
    if n_components is not None:
        if g.shape[1] < n_components:
            raise DataError(
                f"gradient file '{path}': has {g.shape[1]} columns (components) but the model config "
                f"'model.gradient_components' asks for {n_components}"
            )
        g = g[:, :n_components]
    return np.ascontiguousarray(g, dtype=np.float32)


def group_connectivity(series: np.ndarray) -> np.ndarray:
    """Mean Fisher-z functional connectivity of a cohort: (N, R, T) -> (R, R), diagonal zero."""
    x = series - series.mean(axis=-1, keepdims=True)  # (N, R, T)
    x = x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)
    r = np.einsum("nrt,nst->nrs", x, x)  # (N, R, R) Pearson r
    z = np.arctanh(np.clip(r, -0.999999, 0.999999)).mean(axis=0)  # (R, R)
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
