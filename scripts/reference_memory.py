"""How close is `brainjepa memory`? Run the reference Brain-JEPA code's own training step under the same
fake-tensor byte count and compare with its measured H200 peaks (the reference GPU figures in docs/performance.md).

    PYTHONPATH=. python3 scripts/reference_memory.py --reference-repo PATH/TO/Brain-JEPA --size base --batch 16

It imports the reference's encoder, predictor, mask collator and helpers from a checkout (nothing of
it is copied here). Its flash-attn import is served by SDPA, as in the anchor's measurement; the step
is the reference's: target forward + LayerNorm + target selection, context encoder, predictor,
smooth-L1, AdamW (foreach), EMA; bf16 autocast; default masking of configs/ukb_vitb_ep300.yaml.
"""

from __future__ import annotations

import argparse
import copy
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from brainjepa.perf.bench import REFERENCE_H200
from brainjepa.perf.memory import GIB, LiveBytes, fake_parameters


def _qkv_packed_sdpa(qkv: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """flash_attn_qkvpacked_func's contract: qkv (B, N, 3, H, Dh) -> (B, N, H, Dh), through SDPA."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, H, N, Dh)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p).transpose(1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-repo", type=Path, required=True, help="a checkout of the reference Brain-JEPA code")
    ap.add_argument("--size", default="base", choices=["small", "base", "large"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="steps; the peak counts from the third")
    args = ap.parse_args()

    flash_attn = types.ModuleType("flash_attn")
    flash_attn.flash_attn_qkvpacked_func = _qkv_packed_sdpa
    sys.modules["flash_attn"] = flash_attn
    sys.path.insert(0, str(args.reference_repo))
    from src.helper import init_model  # noqa: PLC0415 (the reference checkout is only on the path now)
    from src.masks.spatialtemporal_multiblock import MaskCollator_fmri  # noqa: PLC0415
    from src.masks.utils import apply_masks  # noqa: PLC0415

    rows = np.loadtxt(args.reference_repo / "data" / "gradient_mapping_450.csv", delimiter=",")
    gradient = torch.tensor(rows, dtype=torch.float32)[None]  # (1, 450, 30)
    encoder, predictor = init_model(
        device="cpu",
        patch_size=16,
        crop_size=(450, 160),
        pred_depth=6,
        pred_emb_dim=384,
        model_name=f"vit_{args.size}",
        gradient_pos_embed=gradient,
        attn_mode="flash_attn",
        add_w="mapping",
    )
    target = copy.deepcopy(encoder)
    collator = MaskCollator_fmri(
        input_size=(450, 160),
        patch_size=16,
        enc_mask_scale=(0.84, 1),
        pred_mask_R_scale=(0.45, 0.6),
        pred_mask_T_scale=(0.0, 0.4),
        pred_mask_T_roi_scale=(0.2, 0.6),
        pred_mask_R_roi_scale=(0.15, 0.3),
        allow_overlap=False,
        min_keep=4,
    )
    torch.manual_seed(0)  # the reference collator draws from the global RNG
    batches = [collator([torch.randn(1, 450, 160) for _ in range(args.batch)]) for _ in range(args.steps)]

    fake = FakeTensorMode(allow_non_fake_inputs=True)  # the reference keeps its gradients as a plain attribute
    for net in (encoder, predictor, target):
        fake_parameters(net, fake)
    target.requires_grad_(False)
    live = LiveBytes()
    for net in (encoder, predictor, target):
        for t in [*net.parameters(), *net.buffers()]:
            live.track(t)
    decay = [
        {"params": [p for n, p in net.named_parameters() if "bias" not in n and p.ndim != 1]}
        for net in (encoder, predictor)
    ]
    no_decay = [
        {"params": [p for n, p in net.named_parameters() if "bias" in n or p.ndim == 1], "weight_decay": 0.0}
        for net in (encoder, predictor)
    ]
    optimizer = torch.optim.AdamW(decay + no_decay, foreach=True)
    peaks = []
    with fake, live:
        for imgs, masks_enc, masks_pred in batches:
            imgs = fake.from_tensor(imgs)
            masks_enc = [fake.from_tensor(m) for m in masks_enc]
            masks_pred = [fake.from_tensor(m) for m in masks_pred]
            live.reset_peak()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with torch.no_grad():
                    h = target(imgs)
                    h = apply_masks(F.layer_norm(h, (h.shape[-1],)), masks_pred)
                z = predictor(encoder(imgs, masks_enc), masks_enc, masks_pred)
                loss = F.smooth_l1_loss(z, h)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                torch._foreach_lerp_(list(target.parameters()), list(encoder.parameters()), 0.004)
            del h, z, loss
            peaks.append(live.peak / GIB)
    measured = REFERENCE_H200.get((args.size, args.batch), (None, None))[1]
    versus = f", measured on an H200: {measured} GiB ({max(peaks[2:]) / measured:.2f}x)" if measured else ""
    print(
        f"reference vit_{args.size} batch {args.batch}: estimated peak {max(peaks[2:]):.2f} GiB{versus}; "
        f"per step {[round(p, 2) for p in peaks]}"
    )


if __name__ == "__main__":
    main()
