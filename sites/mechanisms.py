"""What carries the labels of a generated cohort: `Effects`, label mechanisms and generator versions.

A mechanism says through which property of the series the labels (sex, diagnosis) act, so that an
evaluation knows what a method must read to predict them. Each label acts on a pair of networks:
sex on `Effects.sex_networks` (p, q), diagnosis on (`dx_network`, `dx_boost_network`).

- `mixed` (every version): the original effects. Sex weakens one network driver (p in M, q in F), which
  changes amplitude and within-network coupling; diagnosis weakens and slows one driver and strengthens
  another; age lowers the structured amplitude and raises the unstructured noise (so it also changes
  correlations).
- `coupling`: labels change BETWEEN-network correlations only. A shared process c(t) (the drivers' OU
  timescale and HRF, unit variance) enters network p with weight +w and network q with weight s*w,
  s = +1 for M / patients and -1 for F / controls; the networks' own drivers are scaled by sqrt(1 - w^2),
  so every ROI keeps its variance and spectrum, and as c and -c have the same distribution, every ROI's
  marginal distribution is the same in both classes. w varies between subjects (log-normal around
  `coupling_weight`).
- `amplitude`: labels change per-ROI variance only. All fluctuations of a network's ROIs (signal, noise,
  spikes, drift) are scaled by `amplitude_gain` before the baseline intensity is added: network p in M,
  q in F; in patients the diagnosis network by 1/gain and the other by gain. Correlations are exactly
  those of the same subjects without labels.
- `spectrum`: labels change timescales only: the driver's OU timescale x `spectrum_slow` in network p for
  M, q for F; in patients the diagnosis network's x `spectrum_slow` and the other's / `spectrum_slow`.
  Every process keeps unit variance, so variances and lag-0 correlations are unchanged in expectation.
- `null`: labels change nothing (a negative control: every reader should be at chance).

Age: under `mixed` as described; under `amplitude` a gain on all fluctuations of every ROI,
1 + age_amplitude * (age - 60) (correlations unchanged); under `coupling`, `spectrum` and `null` none.
Site effects (TR, noise, gain, spikes, drift) and population B's effects are the same under every
mechanism: they are not labels. Mechanism-specific draws use their own random stream, so one seed gives
the same subjects, phenotypes and site effects under every mechanism.

Versions (`GENERATOR_VERSION`): 1 = the first effects (factor timescales 1.5-6 s, sex strengthens a
driver: `Effects(factor_tau=(1.5, 6.0), sex_gain=0.6)`), 2 = today's `Effects()` defaults, 3 = version 2
plus the mechanisms other than `mixed` (`mixed` files are the same as version 2's). When a default
changes, add a version and pin the old value in `_VERSION_EFFECTS` for every earlier one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import yaml

from brainjepa.errors import ConfigError

GENERATOR_VERSION = 3
MECHANISMS = ("mixed", "coupling", "amplitude", "spectrum", "null")
MECHANISM_SINCE = {"mixed": 1, "coupling": 3, "amplitude": 3, "spectrum": 3, "null": 3}


@dataclass(frozen=True)
class Effects:
    """How phenotypes and populations change the generated dynamics (all modest by design).

    Under `mixed` only: sex_gain, sex_slow, dx_weaken, dx_boost, dx_slow, age_noise; under `mixed` and
    `amplitude`: age_amplitude; coupling_*, amplitude_gain, spectrum_slow: under their mechanism only;
    the networks (sex_networks, dx_network, dx_boost_network) say where the labels act in all."""

    sex_networks: tuple[int, int] = (1, 2)  # driver x (1 + sex_gain) in the first for M, the second for F
    sex_gain: float = (
        -0.5
    )  # negative: weakened (a coupling more than an amplitude effect; the old experiment record (git history))
    dx_network: int = 0  # patients: driver amplitude x (1 - dx_weaken), timescale x dx_slow
    dx_weaken: float = 0.6
    dx_boost_network: int = 3  # patients: compensatory stronger driver in another network
    dx_boost: float = 0.6
    dx_slow: float = 1.6
    sex_slow: float = 1.0  # driver timescale x sex_slow in the first sex network for M, the second for F
    factor_tau: tuple[float, float] = (2.0, 30.0)  # seconds: factor timescales, log-uniform (1/f-like mixture)
    driver_tau: float = 3.0  # seconds: network drivers' timescale
    age_amplitude: float = -0.006  # per year from 60: structured signal amplitude
    age_noise: float = 0.006  # per year from 60: unstructured ROI noise
    subject_factor_sd: float = 0.25  # log-normal individual variability of factor amplitudes
    subject_driver_sd: float = 0.25  # log-normal individual variability of driver amplitudes
    driver_amplitude: float = 0.6
    pop_b_factor_sd: float = 0.30  # population B: fixed log-normal gains on the factors
    pop_b_networks: tuple[int, int] = (4, 5)  # population B: drivers x pop_b_driver_gain
    pop_b_driver_gain: float = 1.4
    pop_b_baseline: float = 0.9
    # pure mechanisms (sizes: AUROC about 0.7-0.95 for 160 subjects x 50 ROIs x 300 s; tests/test_synth_mechanisms.py)
    coupling_weight: float = 0.6  # `coupling`: median weight w of the shared process
    coupling_weight_sd: float = 0.3  # `coupling`: log-normal individual variability of w
    amplitude_gain: float = 1.08  # `amplitude`: fluctuation gain of a label's network
    spectrum_slow: float = 2.5  # `spectrum`: driver timescale factor of a label's network


_VERSION_EFFECTS: dict[int, dict] = {1: {"factor_tau": (1.5, 6.0), "sex_gain": 0.6}, 2: {}, 3: {}}


def effects_for_version(version: int) -> Effects:
    """The `Effects` defaults of generator `version` (1..GENERATOR_VERSION)."""
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version not in _VERSION_EFFECTS:
        raise ConfigError(f"generator version: expected an integer 1..{GENERATOR_VERSION}, got {version!r}")
    return dataclasses.replace(Effects(), **_VERSION_EFFECTS[int(version)])


def check_mechanism(mechanism: str, version: int) -> None:
    """A `ConfigError` unless `mechanism` exists in generator `version`."""
    effects_for_version(version)
    if mechanism not in MECHANISMS:
        raise ConfigError(f"mechanism: expected one of {', '.join(MECHANISMS)}, got {mechanism!r}")
    if version < MECHANISM_SINCE[mechanism]:
        raise ConfigError(
            f"mechanism '{mechanism}' exists from generator version {MECHANISM_SINCE[mechanism]}, "
            f"got version {version} (which has only "
            f"{', '.join(m for m, v in MECHANISM_SINCE.items() if v <= version)})"
        )


def check_effects(eff: Effects, n_networks: int, mechanism: str) -> None:
    """A `ConfigError` unless every network index of `eff` is one of the model's networks and the
    mechanism's sizes are usable."""
    used = {
        "sex_networks": eff.sex_networks,
        "dx_network": (eff.dx_network,),
        "dx_boost_network": (eff.dx_boost_network,),
        "pop_b_networks": eff.pop_b_networks,
    }
    for key, nets in used.items():
        if any(not 0 <= k < n_networks for k in nets):
            raise ConfigError(f"effects {key}: expected network indices 0..{n_networks - 1}, got {nets}")
    sizes = {
        "coupling": ("coupling_weight", "coupling_weight_sd"),
        "amplitude": ("amplitude_gain",),
        "spectrum": ("spectrum_slow",),
    }
    for key in sizes.get(mechanism, ()):
        value = getattr(eff, key)
        if not np.isfinite(value) or value < 0 or (value == 0 and key != "coupling_weight_sd"):
            raise ConfigError(f"effects {key}: expected a positive number for mechanism '{mechanism}', got {value}")
    if mechanism == "coupling":
        for a, b in label_pairs(eff).values():
            if a == b:
                raise ConfigError(f"mechanism 'coupling': a label's two networks must differ, got ({a}, {b})")


def effects_from_pairs(pairs: list[str], source: str = "--effect", base: Effects | None = None) -> Effects:
    """`Effects` from KEY=VALUE strings (values in YAML: `sex_gain=-0.4`, `factor_tau=[1.5, 6]`) over `base`
    (default `Effects()`); a wrong key, a missing '=' or a value of the wrong kind is a `ConfigError`."""
    base = Effects() if base is None else base
    fields = {f.name: f for f in dataclasses.fields(Effects)}
    kwargs: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ConfigError(f"{source} '{pair}': expected KEY=VALUE with KEY one of {', '.join(fields)}")
        value = yaml.safe_load(text)
        default = getattr(base, key)
        if isinstance(default, tuple):
            ok = (
                isinstance(value, list)
                and len(value) == len(default)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            )
            kind = f"a list of {len(default)} numbers"
            value = tuple(type(d)(v) for d, v in zip(default, value, strict=True)) if ok else value
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            kind = "a number"
            value = type(default)(value) if ok else value
        if not ok:
            raise ConfigError(f"{source} {key}: expected {kind}, got {text!r}")
        kwargs[key] = value
    return dataclasses.replace(base, **kwargs)


def label_pairs(eff: Effects) -> dict[str, tuple[int, int]]:
    """The network pair each label acts on under the pure mechanisms."""
    return {"sex": tuple(eff.sex_networks), "diagnosis": (eff.dx_network, eff.dx_boost_network)}


def _contrast(ph: dict[str, np.ndarray], label: str) -> np.ndarray:
    """(B,) +1 for M / patients, -1 for F / controls."""
    return np.where(ph[label] > 0, 1.0, -1.0)


def network_factors(
    ph: dict[str, np.ndarray], eff: Effects, n_net: int, sex: float, dx: tuple[float, float]
) -> np.ndarray:
    """(B, N_net) label factors: x `sex` on network p in M, on q in F; patients x `dx` on the diagnosis pair;
    1 elsewhere (shared by `amplitude` and `spectrum`)."""
    b = ph["sex"].shape[0]
    out = np.ones((b, n_net))
    (p, q), (dp, dq) = label_pairs(eff).values()
    male = ph["sex"] > 0
    out[:, p] *= np.where(male, sex, 1.0)
    out[:, q] *= np.where(male, 1.0, sex)
    patient = ph["diagnosis"] > 0
    out[:, dp] *= np.where(patient, dx[0], 1.0)
    out[:, dq] *= np.where(patient, dx[1], 1.0)
    return out


def spectrum_timescales(ph: dict[str, np.ndarray], eff: Effects, n_net: int) -> np.ndarray:
    """Mechanism `spectrum`: drivers' OU timescales (B, N_net) in seconds (patients: the diagnosis network
    slower, the other faster)."""
    k = eff.spectrum_slow
    return eff.driver_tau * network_factors(ph, eff, n_net, k, (k, 1.0 / k))


def amplitude_gains(ph: dict[str, np.ndarray], eff: Effects, networks: np.ndarray) -> np.ndarray:
    """Mechanism `amplitude`: (B, R) gains on every fluctuation of each ROI (labels x age; patients: the
    diagnosis network weaker, the other stronger)."""
    k = eff.amplitude_gain
    g = network_factors(ph, eff, int(networks.max()) + 1, k, (1.0 / k, k))[:, networks]  # (B, R)
    age = np.clip(1.0 + eff.age_amplitude * (ph["age"] - 60.0), 0.5, None)  # (B,)
    return g * age[:, None]


def coupling_weights(rng: np.random.Generator, ph: dict[str, np.ndarray], eff: Effects) -> np.ndarray:
    """Mechanism `coupling`: signed subject weights (B, P, 2) of the shared processes (one per label) on
    the label's two networks: (w, s*w), w log-normal around `coupling_weight`, s = +1 for M / patients."""
    pairs = label_pairs(eff)
    b = ph["sex"].shape[0]
    counts = np.bincount(np.ravel(list(pairs.values())))
    w_max = np.sqrt(0.9 / counts.max())  # a network's own driver keeps at least 10 % of its variance
    w = eff.coupling_weight * np.exp(rng.normal(0.0, eff.coupling_weight_sd, (b, len(pairs))))  # (B, P)
    w = np.clip(w, 0.0, w_max)
    s = np.stack([_contrast(ph, label) for label in pairs], axis=1)  # (B, P)
    return np.stack([w, s * w], axis=-1)  # (B, P, 2)


def couple_drivers(d: np.ndarray, c: np.ndarray, weights: np.ndarray, eff: Effects) -> np.ndarray:
    """Mix the shared processes `c` (B, P, L) into the network drivers `d` (B, N_net, L) with `weights`
    (B, P, 2) from `coupling_weights`, keeping every driver's variance -> (B, N_net, L) float32."""
    b, n_net, _ = d.shape
    load = np.zeros((b, n_net, c.shape[1]))  # (B, N_net, P)
    for k, (p, q) in enumerate(label_pairs(eff).values()):
        load[:, p, k] += weights[:, k, 0]
        load[:, q, k] += weights[:, k, 1]
    own = np.sqrt(1.0 - (load**2).sum(axis=-1))  # (B, N_net)
    out = own.astype(np.float32)[:, :, None] * d
    out += np.einsum("bnp,bpl->bnl", load.astype(np.float32), c)
    return out
