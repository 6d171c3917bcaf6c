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
CHUNK_BLOCKS = 256  # blocks quantised at a time (2 MiB of fp32)
SCALE_SUFFIX = ".scale"


def n_blocks(n: int) -> int:
    return -(-n // QUANT_BLOCK)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P,) float -> (codes (P,) int8, scales (ceil(P / QUANT_BLOCK),) fp32), round to nearest. Works through
    the vector CHUNK_BLOCKS blocks at a time (a cache-sized working set, no full-size temporaries)."""
    x = x.detach().float().reshape(-1)
    n, nb = x.numel(), n_blocks(x.numel())
    codes = torch.empty(n, dtype=torch.int8)
    scales = torch.empty(nb, dtype=torch.float32)
    for b0 in range(0, nb, CHUNK_BLOCKS):
        b1 = min(nb, b0 + CHUNK_BLOCKS)
        lo, hi = b0 * QUANT_BLOCK, min(n, b1 * QUANT_BLOCK)
        rows = _rows(x[lo:hi])  # (b1 - b0, QUANT_BLOCK)
        amax = rows.abs().amax(dim=1)  # NaN / Inf propagate: checked once below
        scales[b0:b1] = amax / QUANT_LEVELS
        inv = torch.where(amax > 0, QUANT_LEVELS / amax, torch.zeros_like(amax))
        q = (rows * inv[:, None]).round_().clamp_(-QUANT_LEVELS, QUANT_LEVELS)  # (b1 - b0, QUANT_BLOCK)
        codes[lo:hi] = q.view(-1)[: hi - lo]
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("delta has non-finite values: it cannot be quantised")
    return codes, scales


def _rows(chunk: torch.Tensor) -> torch.Tensor:
    """(m,) -> (ceil(m / QUANT_BLOCK), QUANT_BLOCK), zero-padded at the end."""
    pad = (-chunk.numel()) % QUANT_BLOCK
    return (torch.nn.functional.pad(chunk, (0, pad)) if pad else chunk).view(-1, QUANT_BLOCK)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, n: int, name: str = "delta") -> torch.Tensor:
    """Codes and scales -> (n,) fp32 (each value one IEEE multiply: both ends decode bit for bit alike);
    a malformed pair (dtype, length, code range, scale not finite or negative) is a ValueError naming
    `name` and what is wrong."""
    check_codes(codes, scales, n, name)
    return dequantize_chunk(codes, scales, 0, n)


def check_codes(codes: torch.Tensor, scales: torch.Tensor, n: int, name: str = "delta") -> None:
    """ValueError naming `name` unless `codes` / `scales` are a well-formed int8 payload of n values."""
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
    if n and int(codes.min()) == -128:
        raise ValueError(f"'{name}': code -128 outside the symmetric range [-{QUANT_LEVELS}, {QUANT_LEVELS}]")


def dequantize_chunk(codes: torch.Tensor, scales: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Values [lo, hi) of a checked payload as (hi - lo,) fp32, the same bits as `dequantize`'s; `lo` a
    multiple of QUANT_BLOCK (a chunk of a reply decoded on its own, `brainjepa.federation.reply_sets`)."""
    if lo % QUANT_BLOCK:
        raise ValueError(f"chunk start {lo} is not a multiple of the block size {QUANT_BLOCK}")
    out = codes[lo:hi].to(torch.float32)  # (m,)
    b0, full = lo // QUANT_BLOCK, (hi - lo) // QUANT_BLOCK
    if full:
        out[: full * QUANT_BLOCK].view(full, QUANT_BLOCK).mul_(scales[b0 : b0 + full, None])
    if hi - lo > full * QUANT_BLOCK:  # the last, partial block
        out[full * QUANT_BLOCK :].mul_(scales[b0 + full])
    return out


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
        else:
            owed = owed.clone()  # becomes the residual, in place
        codes, scales = quantize(owed)
        payload[name], payload[name + SCALE_SUFFIX] = codes, scales
        new_residual[name] = owed.sub_(dequantize(codes, scales, owed.numel(), name))
    return payload, new_residual


def weights_checksum(sets: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the sets' fp32 bytes in name order: what a site trains from, exactly."""
    h = hashlib.sha256()
    for name in sorted(sets):
        h.update(name.encode())
        h.update(sets[name].detach().float().contiguous().numpy())  # the buffer, no copy
    return h.hexdigest()
