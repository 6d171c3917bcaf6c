"""What both apps agree on for central DP and secure aggregation (no Flower import).

Secure aggregation runs Flower's SecAgg+ (`server.secagg` / `client.secagg`): a round's message then
travels in Flower's legacy FitIns / FitRes layout (one list of unnamed arrays and one config dict), so
the arrays' names, the weight sets a site sends back and how it weights them travel as the extra keys
below, next to the round record's own. What a site sends into the masked sum is its *delta* to the
global weights (small values: fine quantization), already multiplied by its weight inside Flower's
`secaggplus_mod`; the server unmasks only the weighted mean of the deltas.

Central DP clips each site's delta over the trained sets to an L2 norm (`clip_delta`): on the server
(plain rounds), or at the site (secure aggregation, where the server never sees one site's delta).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

# Weight sets a site trains (the EMA target is a moving average of the encoder, not trained).
TRAINED_SETS = ("encoder", "predictor")

# Extra keys of the round config under secure aggregation (next to `RoundSpec.to_record()`'s).
SECAGG_ARRAYS = "secagg-arrays"  # comma-separated names of the FitIns arrays, in order
SECAGG_SETS = "secagg-sets"  # comma-separated weight sets whose deltas the site sends into the sum
SECAGG_WEIGHTING = "secagg-weighting"  # "samples": weight num-examples; "uniform": weight 1
SECAGG_CLIP_NORM = "secagg-clip-norm"  # > 0: the site clips its delta (L2 over SECAGG_SETS) first
SECAGG_CLIP_RANGE = "secagg-clip-range"  # |weight x delta| bound per value (Flower's quantization range)
SECAGG_MAX_WEIGHT = "secagg-max-weight"  # the largest weight a site may send (Flower's max_weight)
SECAGG_KEYS = (SECAGG_ARRAYS, SECAGG_SETS, SECAGG_WEIGHTING, SECAGG_CLIP_NORM, SECAGG_CLIP_RANGE, SECAGG_MAX_WEIGHT)
SITE_NAME = "site-name"  # FitRes metrics: the site's name (the legacy reply has no SITE record)

# Flower's SecAgg+ quantization (SecAggPlusWorkflow defaults): values in [-range, range] -> 2**22 levels,
# masks and sums modulo 2**32.
QUANTIZATION_LEVELS = 2**22
MODULUS = 2**32

Weighting = Literal["samples", "uniform"]


def delta_norm(delta: Mapping[str, torch.Tensor], names: tuple[str, ...] = TRAINED_SETS) -> float:
    """L2 norm of the concatenation of `names`' flat vectors, accumulated in float64."""
    return math.sqrt(sum(float(delta[n].double().square().sum()) for n in names))


def clip_delta(
    delta: Mapping[str, torch.Tensor], clip_norm: float, names: tuple[str, ...] = TRAINED_SETS
) -> tuple[dict[str, torch.Tensor], float]:
    """`names`' deltas scaled by min(1, clip_norm / ||delta||) (one factor for all of them: the norm is
    over their concatenation), and the norm before clipping. Other sets are not returned."""
    norm = delta_norm(delta, names)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {n: delta[n] * factor for n in names}, norm


def secagg_tolerance(clip_range: float, weights: list[float], max_weight: float) -> float:
    """Worst-case absolute error of SecAgg+'s weighted mean of deltas against the exact mean: each site's
    weighted values are stochastically rounded to a grid of step 2 * clip_range / 2**22 (less than one
    step), after Flower's float32 arithmetic on the value (shift and scale to [0, 2**22]: less than half a
    step more, measured 1.01 steps for 2 sites); the sum of k of them is divided by the sum of the
    quantized weights w_i / max_weight (exact for a power-of-two max_weight)."""
    step = 2.0 * clip_range / QUANTIZATION_LEVELS
    return 1.5 * len(weights) * step / (sum(weights) / max_weight)
