"""Real group connectivity shipped with BrainSpace, read without importing vtk.

BrainSpace 0.3 ships HCP-derived Schaefer group FC (main and holdout groups, 100-400 parcels), the
conte69 Schaefer surface labels and the conte69 FC gradient. `brainspace.datasets` loaders import
vtk (4 s); the same files are read here directly from the installed package's data folder.

`model_connectome(n_rois, n_subcortical)` builds the target correlation matrix of the generated
cohorts: the cortical block is Schaefer group FC (reduced to fewer parcels by averaging contiguous
parcels when fewer are asked for), the subcortical block is coupled to cortical networks.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainjepa.errors import DataError

SCALES = (100, 200, 300, 400)


def brainspace_data_dir() -> Path:
    spec = importlib.util.find_spec("brainspace")
    if spec is None or spec.origin is None:
        raise DataError("BrainSpace is not installed: `pip install brainspace` (its data ships in the wheel)")
    return Path(spec.origin).parent / "datasets"


def schaefer_fc(scale: int = 400, group: str = "main") -> np.ndarray:
    """BrainSpace's group FC for Schaefer-`scale` (Pearson r, unit diagonal) -> float64 (scale, scale)."""
    if scale not in SCALES or group not in ("main", "holdout"):
        raise DataError(f"Schaefer group FC exists for scale in {SCALES} and group main/holdout, got {scale}/{group}")
    path = brainspace_data_dir() / "matrices" / f"{group}_group" / f"schaefer_{scale}_mean_connectivity_matrix.csv"
    return np.loadtxt(path, delimiter=",", dtype=np.float64)


def reduce_fc(fc: np.ndarray, n: int) -> np.ndarray:
    """Average an (M, M) FC into n groups of contiguous parcels -> (n, n), unit diagonal."""
    m = fc.shape[0]
    if n > m:
        raise DataError(f"cannot build {n} cortical ROIs from a {m}-parcel connectivity")
    group = np.repeat(np.arange(n), np.diff(np.linspace(0, m, n + 1).astype(int)))  # (M,)
    onehot = np.eye(n)[group]  # (M, n)
    counts = onehot.sum(axis=0)
    red = onehot.T @ fc @ onehot / np.outer(counts, counts)
    np.fill_diagonal(red, 1.0)
    return red


def cortical_fc(n: int, group: str = "main") -> np.ndarray:
    """Schaefer group FC at `n` parcels: shipped when n is a shipped scale, else reduced from 400."""
    if n in SCALES:
        return schaefer_fc(n, group)
    return reduce_fc(schaefer_fc(400, group), n)


def networks_from_fc(fc: np.ndarray, n_networks: int = 7) -> np.ndarray:
    """Data-driven network labels (N,) in 0..n_networks-1: Ward clustering of the FC's leading eigenmodes.

    Deterministic (no random initialisation). Networks are numbered by decreasing size (ties by first
    ROI), so labels are stable.
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    n_networks = min(n_networks, fc.shape[0])
    w, v = np.linalg.eigh((fc + fc.T) / 2)
    emb = v[:, ::-1][:, :n_networks] * np.sqrt(np.maximum(w[::-1][:n_networks], 0))  # (N, n_net)
    lab = fcluster(linkage(emb, method="ward"), t=n_networks, criterion="maxclust") - 1
    k = int(lab.max()) + 1
    sizes = np.bincount(lab, minlength=k)
    first = np.array([np.flatnonzero(lab == j)[0] for j in range(k)])
    order = np.lexsort((first, -sizes))
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    return remap[lab]


def nearest_correlation(c: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """Symmetric positive-definite matrix with unit diagonal close to `c` (eigenvalue clipping)."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    c = (v * np.maximum(w, floor)) @ v.T
    d = np.sqrt(np.diag(c))
    return c / np.outer(d, d)


@dataclass(frozen=True)
class Connectome:
    corr: np.ndarray  # (R, R) positive-definite correlation, subcortex first
    networks: np.ndarray  # (R,) network label per ROI (subcortical ROIs take their partner network)
    n_subcortical: int

    @property
    def n_rois(self) -> int:
        return int(self.corr.shape[0])


def model_connectome(n_rois: int = 450, n_subcortical: int | None = None, n_networks: int = 7) -> Connectome:
    """Target correlation of the generated cohorts: S subcortical ROIs, then R - S cortical (Schaefer)."""
    if n_subcortical is None:
        n_subcortical = max(1, round(n_rois / 9))  # 50 of 450, as in Tian-III + Schaefer-400
    n_ctx = n_rois - n_subcortical
    if n_subcortical < 0 or n_ctx < n_networks:
        raise DataError(f"need at least {n_networks} cortical ROIs, got n_rois={n_rois}, n_subcortical={n_subcortical}")
    ctx = cortical_fc(n_ctx)  # (C, C)
    net_ctx = networks_from_fc(ctx, n_networks)
    s = n_subcortical
    net_sub = np.arange(s) % n_networks  # each subcortical ROI follows one cortical network
    nets = np.concatenate([net_sub, net_ctx])  # (R,)
    r = n_rois
    c = np.zeros((r, r))
    c[s:, s:] = ctx
    # subcortex <-> cortex: a fraction of the partner network's mean coupling, a little elsewhere
    same = (net_sub[:, None] == net_ctx[None, :]).astype(float)  # (S, C)
    ctx_mean = np.array([ctx[net_ctx == k].mean(axis=0) for k in range(n_networks)])  # (n_net, C)
    c[:s, s:] = 0.6 * ctx_mean[net_sub] * (0.5 + 0.5 * same)
    c[s:, :s] = c[:s, s:].T
    c[:s, :s] = np.where(net_sub[:, None] == net_sub[None, :], 0.45, 0.12)
    np.fill_diagonal(c, 1.0)
    return Connectome(corr=nearest_correlation(c), networks=nets, n_subcortical=s)
