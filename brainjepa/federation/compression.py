"""Compressed weight-set deltas (run config `wire-dtype = "int8"`): blockwise int8 with error feedback.

A delta vector x (P,) travels as two arrays: `<set>` int8 codes (P,) and `<set>.scale` fp32 scales
(ceil(P / QUANT_BLOCK),), one per block of QUANT_BLOCK consecutive values:

    scale_b = max |x_i| over block b / 127          code_i = round(x_i / scale_b) in [-127, 127]
    decoded_i = code_i * scale_b                     |decoded_i - x_i| <= scale_b / 2 = max_b / 254

Bytes: P + 4 P / QUANT_BLOCK, i.e. (1 + 4 / 2048) / 4 = 0.2505 of fp32 (Flower's `count_bytes` adds
each array's .npy header and key, ~100 bytes). Rounding is to nearest (deterministic), so both ends
decode the same bits: the coordinator's downlink reference and the site's copy agree exactly.

Error feedback (Seide et al. 2014, Karimireddy et al. 2019): what a round's quantisation drops is not
lost but owed. The site keeps the residual e = (delta + e_prev) - decoded between rounds
(`client.wire`, private to the site) and adds it to its next delta, so the SUM of what the server
decodes over rounds tracks the sum of the true deltas within one round's error, where plain rounding
lets the bias of each round add up.

Downlink: the coordinator sends the new global as an int8 delta against the previous reference that
in-sync sites hold (`server.downlink`); `weights_checksum` proves that a site reconstructed exactly what
the coordinator meant it to train from. This module only encodes, decodes and checks; it holds no state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

QUANT_BLOCK = 2048  # values per fp32 scale
QUANT_LEVELS = 127  # codes in [-127, 127] (symmetric: -128 unused)
SCALE_SUFFIX = ".scale"


def n_blocks(n: int) -> int:
    return -(-n // QUANT_BLOCK)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P,) float -> (codes (P,) int8, scales (ceil(P / QUANT_BLOCK),) fp32), round to nearest."""
    x = x.detach().float().reshape(-1)
    n, nb = x.numel(), n_blocks(x.numel())
    padded = torch.nn.functional.pad(x, (0, nb * QUANT_BLOCK - n)).view(nb, QUANT_BLOCK)  # (nb, B)
    if not bool(torch.isfinite(padded).all()):
        raise ValueError("delta has non-finite values: it cannot be quantised")
    scales = padded.abs().amax(dim=1) / QUANT_LEVELS  # (nb,)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(padded / safe[:, None]).clamp_(-QUANT_LEVELS, QUANT_LEVELS).to(torch.int8)
    return codes.view(-1)[:n].clone(), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, n: int, name: str = "delta") -> torch.Tensor:
    """Codes and scales -> (n,) fp32; a malformed pair (dtype, length, code range, scale not finite or
    negative) is a ValueError naming `name` and what is wrong."""
    if codes.dtype != torch.int8 or scales.dtype != torch.float32:
        raise ValueError(f"'{name}': codes {codes.dtype} / scales {scales.dtype}, expected int8 / float32")
    if codes.dim() != 1 or codes.numel() != n:
        raise ValueError(f"'{name}': {tuple(codes.shape)} codes, expected ({n},)")
    nb = n_blocks(n)
    if scales.dim() != 1 or scales.numel() != nb:
        raise ValueError(
            f"'{name}{SCALE_SUFFIX}': {tuple(scales.shape)} scales, expected ({nb},) (blocks of {QUANT_BLOCK})"
        )
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise ValueError(f"'{name}{SCALE_SUFFIX}': scales must be finite and >= 0 (got NaN, Inf or negative)")
    if bool((codes == -128).any()):
        raise ValueError(f"'{name}': code -128 outside the symmetric range [-{QUANT_LEVELS}, {QUANT_LEVELS}]")
    padded = torch.nn.functional.pad(codes.float(), (0, nb * QUANT_BLOCK - n)).view(nb, QUANT_BLOCK)  # (nb, B)
    return (padded * scales[:, None]).view(-1)[:n].clone()


def encode_deltas(deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{set: (P,) delta} -> the wire payload {set: int8 codes, set.scale: fp32 scales}."""
    out: dict[str, torch.Tensor] = {}
    for name, vec in deltas.items():
        out[name], out[name + SCALE_SUFFIX] = quantize(vec)
    return out


def decode_deltas(payload: Mapping[str, torch.Tensor], sizes: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The payload -> {set: (P,) fp32 delta} for exactly the sets of `sizes` (set -> P); ValueError
    naming what is missing, extra or malformed."""
    expected = {k for name in sizes for k in (name, name + SCALE_SUFFIX)}
    if set(payload) != expected:
        raise ValueError(f"int8 payload holds {sorted(payload)}, expected {sorted(expected)}")
    return {name: dequantize(payload[name], payload[name + SCALE_SUFFIX], n, name) for name, n in sizes.items()}


def is_delta_payload(payload: Mapping[str, torch.Tensor]) -> bool:
    """Whether a downlink payload is int8 deltas (else full-precision weights: a resync)."""
    return any(k.endswith(SCALE_SUFFIX) for k in payload)


def feedback_step(
    delta: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor] | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One round of error feedback: quantise delta + residual; returns (payload, the new residual).
    A residual of another size (another model) is ignored."""
    payload: dict[str, torch.Tensor] = {}
    new_residual: dict[str, torch.Tensor] = {}
    for name, d in delta.items():
        owed = d.float()
        if residual is not None and name in residual and residual[name].numel() == owed.numel():
            owed = owed + residual[name]
        codes, scales = quantize(owed)
        payload[name], payload[name + SCALE_SUFFIX] = codes, scales
        new_residual[name] = owed - dequantize(codes, scales, owed.numel(), name)
    return payload, new_residual


def weights_checksum(sets: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the sets' fp32 bytes in name order: what a site trains from, exactly."""
    h = hashlib.sha256()
    for name in sorted(sets):
        h.update(name.encode())
        h.update(sets[name].detach().float().contiguous().numpy())  # the buffer, no copy
    return h.hexdigest()
