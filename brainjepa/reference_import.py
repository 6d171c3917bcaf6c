"""Import a checkpoint of the reference Brain-JEPA code (github Eric-LRL/Brain-JEPA) as one of ours.

The reference saves `torch.save({"encoder", "predictor", "target_encoder", "opt", "scaler", "epoch",
"loss", ...})` (src/train.py), each network wrapped in DistributedDataParallel, so its keys may start
with `module.` (stripped here, per network). It is read with `torch.load(weights_only=True)`: tensors
and plain containers only, never arbitrary pickled objects.

Key map (reference -> ours; `{i}` a block index, `{w}` weight or bias; D encoder width, Dp predictor
width, p patch size, k gradient components, R ROIs, W = T/p time patches):

| reference key (`encoder.`, `target_encoder.`)        | ours (`encoder.`, `target.`)    | shape            |
|------------------------------------------------------|---------------------------------|------------------|
| patch_embed.proj.weight (Conv2d, kernel (1, p))      | patch_embed.proj.weight         | (D,1,1,p)->(D,p) |
| patch_embed.proj.bias                                | patch_embed.proj.bias           | (D,)             |
| pos_embed_proj.predictor_pos_embed_proj.{w}          | pos_embed.spatial.proj.{w}      | (D/2, k), (D/2,) |
| pos_embed_proj.emb_h (frozen sin-cos time half)      | - recomputed; checked equal     | (R*W, D/2)       |
| blocks.{i}.norm1 / norm2 .{w}                        | blocks.{i}.norm1 / norm2 .{w}   | (D,)             |
| blocks.{i}.attn.qkv.{w}                              | blocks.{i}.attn.qkv.{w}         | (3D, D), (3D,)   |
| blocks.{i}.attn.proj.{w}                             | blocks.{i}.attn.proj.{w}        | (D, D), (D,)     |
| blocks.{i}.mlp.fc1.{w} / mlp.fc2.{w}                 | blocks.{i}.mlp.fc1 / fc2 .{w}   | (4D, D), (D, 4D) |
| norm.{w}                                             | norm.{w}                        | (D,)             |
| - (a plain attribute, not saved)                     | pos_embed.spatial.gradients     | (R, k) from CSV  |

| reference key (`predictor.`)                         | ours (`predictor.`)             | shape            |
|------------------------------------------------------|---------------------------------|------------------|
| predictor_embed.{w}                                  | embed.{w}                       | (Dp, D), (Dp,)   |
| mask_token                                           | mask_token.token                | (1, 1, Dp)       |
| predictor_2dpe_proj.predictor_pos_embed_proj.{w}     | pos_embed.spatial.proj.{w}      | (Dp/2, k)        |
| predictor_2dpe_proj.emb_h                            | - recomputed; checked equal     | (R*W, Dp/2)      |
| predictor_blocks.{i}.(as the encoder's blocks)       | blocks.{i}.(same)               | Dp wide          |
| predictor_norm.{w}                                   | norm.{w}                        | (Dp,)            |
| predictor_proj.{w}                                   | proj.{w}                        | (D, Dp), (D,)    |

Widths, depths, p, k and the MLP ratio come from the shapes; R from the gradient file; W from the rows
of `emb_h` (so T = W * p); the head count from the model size (S 6, B 12, L 16) or given: shapes do not
hold it, and the reference predictor uses the encoder's. Only the reference's `add_w: mapping` (the
gradient half, its released config) is supported. Its `normalization_params_train.npz` holds `medians`
and `iqrs` (R,), the robust scaling we use (`sites.scaling.RobustScaling`).
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brainjepa.checkpoint import save_checkpoint
from brainjepa.config import ENCODER_SIZES, DataConfig, ModelConfig, PretrainConfig, to_dict
from brainjepa.errors import DataError
from brainjepa.gradients import gradient_checksum, load_gradients
from brainjepa.jepa import JEPAModels
from sites.scaling import RobustScaling

log = logging.getLogger(__name__)

PARTS = {"encoder": "encoder", "predictor": "predictor", "target_encoder": "target"}  # reference -> ours
HEADS = {"S": 6, "B": 12, "L": 16}  # the reference's vit_small / vit_base / vit_large
SIZE_NAMES = {"S": "small", "B": "base", "L": "large"}
_W = r"(weight|bias)"
_BLOCK = r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\." + _W
ENCODER_RULES = [
    (rf"patch_embed\.proj\.{_W}", r"patch_embed.proj.\1"),
    (rf"pos_embed_proj\.predictor_pos_embed_proj\.{_W}", r"pos_embed.spatial.proj.\1"),
    (rf"blocks\.(\d+)\.{_BLOCK}", r"blocks.\1.\2.\3"),
    (rf"norm\.{_W}", r"norm.\1"),
]
PREDICTOR_RULES = [
    (rf"predictor_embed\.{_W}", r"embed.\1"),
    (r"mask_token", "mask_token.token"),
    (rf"predictor_2dpe_proj\.predictor_pos_embed_proj\.{_W}", r"pos_embed.spatial.proj.\1"),
    (rf"predictor_blocks\.(\d+)\.{_BLOCK}", r"blocks.\1.\2.\3"),
    (rf"predictor_norm\.{_W}", r"norm.\1"),
    (rf"predictor_proj\.{_W}", r"proj.\1"),
]
SINCOS_KEY = {
    "encoder": "pos_embed_proj.emb_h",
    "target_encoder": "pos_embed_proj.emb_h",
    "predictor": "predictor_2dpe_proj.emb_h",
}
SINCOS_ATOL = 1e-6  # float32 round-off; the tables are computed the same way (float64, then float32)


@dataclass(frozen=True)
class ImportResult:
    path: Path
    model: ModelConfig
    epoch: int | None
    sincos_max_diff: float  # largest |emb_h - our sin-cos time table| over the three networks
    scaling: str  # "scaling", "reference_normalization" or "none": where the npz went


def read_reference(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """The three state dicts (`module.` prefixes stripped) and the scalar metadata of a reference file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"reference checkpoint '{path}' does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DataError(
            f"reference checkpoint '{path}': holds objects beyond tensors and plain containers, "
            f"which we refuse to unpickle (torch.load weights_only=True said: {e})"
        ) from e
    except (RuntimeError, EOFError) as e:
        raise DataError(f"reference checkpoint '{path}': not a readable torch checkpoint: {e}") from e
    if not isinstance(raw, dict) or any(not isinstance(raw.get(p), dict) for p in PARTS):
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise DataError(f"reference checkpoint '{path}': expected a dict with state dicts {list(PARTS)}, found {found}")
    parts = {}
    for part in PARTS:
        sd = {k.removeprefix("module."): v for k, v in raw[part].items()}
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise DataError(f"reference checkpoint '{path}': {part} key '{bad[0]}' is not a tensor")
        parts[part] = sd
    meta = {k: v for k, v in raw.items() if k in ("epoch", "loss", "batch_size", "world_size", "lr")}
    return parts, meta


def _need(sd: dict[str, torch.Tensor], part: str, key: str, ndim: int) -> torch.Tensor:
    if key not in sd:
        if part != "predictor" and key.startswith("pos_embed_proj.") and "pos_embed_proj.emb_w" in sd:
            raise DataError(
                f"reference {part}: has 'pos_embed_proj.emb_w' (add_w: origin, a sin-cos ROI half) "
                "and no gradient projection: only add_w: mapping checkpoints can be imported"
            )
        raise DataError(f"reference {part}: key '{key}' is missing")
    if sd[key].ndim != ndim:
        shape = tuple(sd[key].shape)
        raise DataError(f"reference {part} key '{key}': expected {ndim} dimensions, got shape {shape}")
    return sd[key]


def _depth(sd: dict[str, torch.Tensor], prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def head_count(size: str | None, num_heads: int | None, width: int) -> int:
    """--num-heads when given (it wins over --size), else the reference's count for --size S / B / L."""
    if num_heads is not None:
        if size is not None:
            log.warning("both --size %s and --num-heads %d given: using %d heads", size, num_heads, num_heads)
        return num_heads
    if size is None:
        raise DataError(
            "the head count is not in the weights' shapes: give --size S|B|L (6, 12, 16 heads, the "
            "reference's vit_small / vit_base / vit_large) or --num-heads N"
        )
    key = {"s": "S", "small": "S", "b": "B", "base": "B", "l": "L", "large": "L"}.get(size.lower())
    if key is None:
        raise DataError(f"--size: expected S, B or L, got '{size}'")
    expected = ENCODER_SIZES[SIZE_NAMES[key]][0]
    if width != expected:
        raise DataError(
            f"--size {size}: the reference's {SIZE_NAMES[key]} model is {expected} wide, this "
            f"checkpoint's encoder is {width} wide; give --num-heads N for another model"
        )
    return HEADS[key]


def infer_config(
    parts: dict[str, dict[str, torch.Tensor]],
    n_rois: int,
    heads: int,
    n_frames: int | None = None,
    patch_size: int | None = None,
) -> ModelConfig:
    """Our ModelConfig of a reference model, from its weights' shapes, R and the head count."""
    enc, pred = parts["encoder"], parts["predictor"]
    w = _need(enc, "encoder", "patch_embed.proj.weight", 4)  # (D, 1, 1, p) Conv2d
    if tuple(w.shape[1:3]) != (1, 1):
        raise DataError(
            f"reference encoder key 'patch_embed.proj.weight': expected a Conv2d weight (D, 1, 1, p) "
            f"(one input channel, kernel (1, p)), got shape {tuple(w.shape)}"
        )
    D, p = int(w.shape[0]), int(w.shape[3])
    k = int(_need(enc, "encoder", "pos_embed_proj.predictor_pos_embed_proj.weight", 2).shape[1])  # (D/2, k)
    rows = int(_need(enc, "encoder", SINCOS_KEY["encoder"], 2).shape[0])  # (R*W, D/2)
    if rows % n_rois:
        raise DataError(
            f"reference encoder key '{SINCOS_KEY['encoder']}' has {rows} rows (ROIs x time patches), "
            f"not a multiple of the gradient file's {n_rois} ROIs"
        )
    T = rows // n_rois * p
    if patch_size is not None and patch_size != p:
        raise DataError(f"--patch-size {patch_size}: the checkpoint's patch embedding has kernel (1, {p})")
    if n_frames is not None and n_frames != T:
        raise DataError(
            f"--n-frames {n_frames}: the checkpoint's '{SINCOS_KEY['encoder']}' has {rows // n_rois} "
            f"time patches per ROI at patch size {p}, i.e. {T} frames"
        )
    hidden = int(_need(enc, "encoder", "blocks.0.mlp.fc1.weight", 2).shape[0])  # (4D, D)
    size = {d: name for name, (d, _, _) in ENCODER_SIZES.items()}.get(D, "tiny")  # a label: all set below
    return ModelConfig(
        size=size,
        n_rois=n_rois,
        n_frames=T,
        patch_size=p,
        gradient_components=k,  # type: ignore[arg-type]
        embed_dim=D,
        depth=_depth(enc, "blocks"),
        num_heads=heads,
        pred_dim=int(_need(pred, "predictor", "predictor_embed.weight", 2).shape[0]),  # (Dp, D)
        pred_depth=_depth(pred, "predictor_blocks"),
        pred_heads=heads,
        mlp_ratio=hidden / D,
    )


def _our_key(part: str, key: str) -> str | None:
    for pattern, repl in PREDICTOR_RULES if part == "predictor" else ENCODER_RULES:
        if re.fullmatch(pattern, key):
            return f"{PARTS[part]}." + re.sub(pattern, repl, key)
    return None


def convert(parts: dict[str, dict[str, torch.Tensor]], models: JEPAModels) -> tuple[dict[str, torch.Tensor], float]:
    """Our `models.state_dict()` with every weight from the reference; every reference key is used,
    every one of ours is filled (the gradient buffers stay as built). Returns it and the sin-cos check."""
    ours = models.state_dict()
    done, max_diff = set(), 0.0
    for part, sd in parts.items():
        for key, value in sd.items():
            if key == SINCOS_KEY[part]:
                max_diff = max(max_diff, _check_sincos(part, value, models))
                continue
            name = _our_key(part, key)
            if name is None or name not in ours:
                raise DataError(
                    f"reference {part} key '{key}' (shape {tuple(value.shape)}) has no counterpart in "
                    f"our model{f' (would be {name!r})' if name else ''}"
                )
            if key == "patch_embed.proj.weight" and value.ndim == 4 and tuple(value.shape[1:3]) == (1, 1):
                value = value.reshape(value.shape[0], value.shape[3])  # Conv2d (D, 1, 1, p) -> Linear (D, p)
            if value.shape != ours[name].shape:
                raise DataError(
                    f"reference {part} key '{key}' has shape {tuple(value.shape)}, our '{name}' "
                    f"expects {tuple(ours[name].shape)}"
                )
            ours[name] = value.detach().to(ours[name].dtype).clone()
            done.add(name)
    missing = [k for k in ours if k not in done and not k.endswith(".spatial.gradients")]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(
            f"reference checkpoint has no weight for our '{missing[0]}' (shape {tuple(ours[missing[0]].shape)}){more}"
        )
    for part in parts:
        if SINCOS_KEY[part] not in parts[part]:
            raise DataError(f"reference {part}: key '{SINCOS_KEY[part]}' is missing")
    return ours, max_diff


def _check_sincos(part: str, emb_h: torch.Tensor, models: JEPAModels) -> float:
    """The reference's frozen time half (R*W, D/2), token r*W + t holding sincos(t), against ours."""
    pe = getattr(models, PARTS[part]).pos_embed
    ours = pe.temporal[None].expand(pe.n_rois, -1, -1).reshape(pe.n_rois * pe.n_time, -1)  # (R*W, D/2)
    if emb_h.shape != ours.shape:
        raise DataError(
            f"reference {part} key '{SINCOS_KEY[part]}' has shape {tuple(emb_h.shape)}, "
            f"our sin-cos time table is {tuple(ours.shape)}"
        )
    diff = float((emb_h.float() - ours).abs().max())
    if diff > SINCOS_ATOL:
        raise DataError(
            f"reference {part} key '{SINCOS_KEY[part]}' differs from our sin-cos time table by up to "
            f"{diff:.3g} (tolerance {SINCOS_ATOL}): not the positions our model computes"
        )
    return diff


def read_normalization(path: str | Path, n_rois: int) -> tuple[dict | None, dict | None]:
    """The reference's normalization_params_train.npz -> (our `scaling` dict, None) when it holds
    `medians` / `iqrs` of R ROIs, else (None, its arrays as lists) for `reference_normalization`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"normalization file '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"normalization file '{path}': not a readable .npz of arrays: {e}") from e
    if {"medians", "iqrs"} <= set(arrays):
        med, iqr = arrays["medians"].astype(np.float64), arrays["iqrs"].astype(np.float64)
        if med.shape != (n_rois,) or iqr.shape != (n_rois,):
            raise DataError(
                f"normalization file '{path}': medians {med.shape} and iqrs {iqr.shape}, expected "
                f"({n_rois},) each (the gradient file's ROIs)"
            )
        d = RobustScaling(med, iqr, n_subjects=0, method="reference-npz").to_dict()  # subject count not recorded
        RobustScaling.from_dict(d)  # zero / invalid IQRs are a DataError here
        return d, None
    log.warning(
        "normalization file '%s' holds %s, not medians/iqrs: stored as 'reference_normalization', "
        "not used as our scaling",
        path,
        sorted(arrays),
    )
    return None, {k: v.tolist() for k, v in arrays.items()}


def import_reference(
    ckpt: str | Path,
    gradients: str | Path,
    out: str | Path,
    size: str | None = None,
    num_heads: int | None = None,
    normalization: str | Path | None = None,
    n_frames: int | None = None,
    patch_size: int | None = None,
) -> ImportResult:
    """Convert a reference checkpoint into ours at `out` (kind "pretrain", step 0, no optimizer state)."""
    parts, meta = read_reference(ckpt)
    k = _need(parts["encoder"], "encoder", "pos_embed_proj.predictor_pos_embed_proj.weight", 2).shape[1]
    grads = load_gradients(gradients, n_components=int(k))  # (R, k) float32
    width = int(_need(parts["encoder"], "encoder", "patch_embed.proj.weight", 4).shape[0])
    cfg = infer_config(parts, grads.shape[0], head_count(size, num_heads, width), n_frames, patch_size)
    models = JEPAModels(cfg, torch.from_numpy(grads))
    state, max_diff = convert(parts, models)
    models.load_state_dict(state)  # strict: our own loader accepts it
    scaling, ref_norm = read_normalization(normalization, cfg.n_rois) if normalization else (None, None)
    extra = {} if ref_norm is None else {"reference_normalization": ref_norm}
    pcfg = PretrainConfig(model=cfg, data=DataConfig(gradients=str(Path(gradients).resolve())))
    path = save_checkpoint(
        out,
        kind="pretrain",
        step=0,
        config=to_dict(pcfg),
        model_config=to_dict(cfg),
        gradients=grads,
        gradient_checksum=gradient_checksum(grads),
        gradient_source=str(gradients),
        models=models.state_dict(),
        trainer=None,
        scaling=scaling,
        reference={"source": str(ckpt), "normalization": str(normalization) if normalization else None, **meta},
        **extra,
    )
    where_scaling = "scaling" if scaling else "reference_normalization" if ref_norm else "none"
    log.info(
        "imported %s (epoch %s): %s, D=%d depth=%d heads=%d, predictor %d/%d, R=%d T=%d p=%d k=%d -> %s",
        ckpt,
        meta.get("epoch"),
        cfg.size,
        cfg.embed_dim,
        cfg.depth,
        cfg.num_heads,
        cfg.pred_dim,
        cfg.pred_depth,
        cfg.n_rois,
        cfg.n_frames,
        cfg.patch_size,
        cfg.gradient_components,
        path,
    )
    return ImportResult(Path(path), cfg, meta.get("epoch"), max_diff, where_scaling)
