"""Realistic generated multi-site cohorts, written exactly like real ROI-series sites.

Model (per subject; everything from one seeded `numpy.random.Generator` per site, a mechanism's own draws
from a second one):
- Connectivity: the target correlation is BrainSpace's real Schaefer group FC plus a subcortical
  block (`sites.connectome.model_connectome`); its leading K eigenmodes drive K latent factors and a
  diagonal residual drives ROI-specific processes. Subjects scale the factors individually
  (log-normal), so every subject has its own FC around the group FC.
- Network drivers: one extra shared process per (data-driven) network adds within-network coupling.
- Dynamics: every latent process is an Ornstein-Uhlenbeck (AR(1)) process with its own timescale,
  convolved with the canonical double-gamma HRF (BOLD-like), computed in the frequency domain. The
  factors' timescales are log-uniform over 2-30 s, so their sum has a roughly 1/f spectrum over the
  BOLD band and keeps some memory across a 35 s patch (drivers 3 s, ROI-specific processes 1 s).
- Phenotypes change the dynamics in known, modest ways (`Effects`), through a chosen label mechanism
  (`sites.mechanisms`: what carries the labels). `mixed` (the default): sex weakens one of two network
  drivers (to half; the first network in M, the second in F), which changes within-network coupling
  more than amplitude; diagnosis weakens one network's driver and slows its timescale, and strengthens
  another's (compensation); age lowers the signal amplitude and raises the unstructured noise.
  `coupling`, `amplitude` and `spectrum` put every label effect into between-network correlations,
  per-ROI variances or timescales only (age: a variance gain under `amplitude`, nothing otherwise);
  `null` into nothing. Individual variability keeps every effect far from decisive.
- Versions (`GENERATOR_VERSION`, `version=`): generator version 1 had factor timescales of 1.5-6 s and a
  sex driver strengthened by 1.6x, an amplitude effect any random projection reads
  (`Effects(factor_tau=(1.5, 6.0), sex_gain=0.6)`; the old experiment record (git history)); version 2 has today's
  `Effects()` defaults; version 3 adds the mechanisms (its `mixed` files are version 2's).
- Site effects (`sites.acquisition.SiteSpec`): TR, scan length, thermal noise level, intensity gain, motion spikes.
- Populations A and B: B has a shifted FC (fixed per-factor gains), stronger drivers in two other
  networks, an older age distribution, a higher diagnosis prevalence and a lower baseline intensity.
- BOLD scale: each ROI has a baseline intensity (hundreds of scanner units, varying per subject) and
  fluctuations of about 1 % of it, plus a slow drift; what `prepare` would give without cleaning.

On disk (per site folder): `roi/<subject>.npy` float32 (R, L) at the site TR, `participants.tsv`
(participant_id, age, sex [0 = F, 1 = M], diagnosis [0 = control, 1 = patient], population, site),
`<site>.yaml` (a valid site config; its header names the generator version and mechanism) and
`synth.json` (all generation parameters: `read_generator_record`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from brainjepa.errors import DataError
from sites import mechanisms as mech
from sites.acquisition import SiteSpec, default_site_specs
from sites.connectome import Connectome, model_connectome
from sites.mechanisms import GENERATOR_VERSION, MECHANISMS, Effects, effects_for_version, effects_from_pairs
from sites.participants import write_participants
from sites.roi_io import write_roi_npy

log = logging.getLogger(__name__)

__all__ = [
    "GENERATOR_VERSION",
    "MECHANISMS",
    "Effects",
    "effects_for_version",
    "effects_from_pairs",
    "generate_cohorts",
    "generate_site",
    "hrf",
    "read_generator_record",
]


def hrf(tr: float, length_s: float = 32.0) -> np.ndarray:
    """Canonical double-gamma haemodynamic response sampled every `tr` seconds (unit peak)."""
    from math import gamma

    t = np.arange(0, length_s, tr)
    h = t**5 * np.exp(-t) / gamma(6) - t**15 * np.exp(-t) / (6.0 * gamma(16))  # gamma pdfs, shapes 6 and 16
    return h / h.max()


def _filtered_noise(
    rng: np.random.Generator, shape: tuple[int, ...], phi: np.ndarray, h: np.ndarray, n: int
) -> np.ndarray:
    """OU (AR(1) with coefficients `phi`, broadcastable to `shape`) noise convolved with `h`.

    Returns (*shape, n) float32 with unit variance per channel (the filter's theoretical variance,
    not the sample's). Computed with FFTs over a burn-in padded length: no loop over time or channels.
    """
    from scipy import fft

    burn = int(np.ceil(3 * len(h)))
    m = fft.next_fast_len(n + burn, real=True)
    e = rng.standard_normal((*shape, m), dtype=np.float32)
    w = np.exp(-2j * np.pi * np.fft.rfftfreq(m))  # (F,) e^{-i omega}
    transfer = fft.rfft(h, m) / (1.0 - np.asarray(phi)[..., None] * w)  # (..., F)
    p = np.abs(transfer) ** 2
    var = (2.0 * p.sum(axis=-1) - p[..., 0] - (p[..., -1] if m % 2 == 0 else 0.0)) / m  # Parseval
    transfer = (transfer / np.sqrt(var)[..., None]).astype(np.complex64)
    return fft.irfft(fft.rfft(e, axis=-1) * transfer, m, axis=-1)[..., burn : burn + n]


@dataclass(frozen=True)
class _Model:
    conn: Connectome
    loadings: np.ndarray  # (R, K) eigenmodes x sqrt(eigenvalues)
    resid: np.ndarray  # (R,) residual SD per ROI
    factor_tau: np.ndarray  # (K,) seconds
    baseline: np.ndarray  # (R,) intensity
    pop_b_gain: np.ndarray  # (K,)


def _build_model(n_rois: int, n_subcortical: int | None, n_factors: int, seed: int, eff: Effects) -> _Model:
    conn = model_connectome(n_rois, n_subcortical)
    w, v = np.linalg.eigh(conn.corr)
    k = min(n_factors, n_rois)
    w, v = w[::-1][:k], v[:, ::-1][:, :k]
    loadings = v * np.sqrt(w)  # (R, K)
    resid = np.sqrt(np.clip(1.0 - (loadings**2).sum(axis=1), 0.02, None))  # (R,)
    rng = np.random.default_rng([seed, 10_000])  # cohort-wide constants (same for every site)
    lo, hi = np.log(eff.factor_tau)
    factor_tau = np.exp(rng.uniform(lo, hi, k))  # log-uniform: a mixture of OU timescales (1/f-like)
    baseline = rng.uniform(400.0, 1200.0, n_rois)
    baseline[: conn.n_subcortical] *= 0.7  # subcortex: lower intensity
    pop_b_gain = np.exp(rng.normal(0.0, eff.pop_b_factor_sd, k))
    return _Model(conn, loadings, resid, factor_tau, baseline, pop_b_gain)


def _phenotypes(rng: np.random.Generator, n: int, population: str) -> dict[str, np.ndarray]:
    if population == "A":
        age = rng.uniform(45.0, 80.0, n)
        dx = (rng.random(n) < 0.25).astype(np.float64)
    else:
        age = np.clip(rng.normal(64.0, 7.0, n), 40.0, 90.0)
        dx = (rng.random(n) < 0.35).astype(np.float64)
    sex = (rng.random(n) < 0.5).astype(np.float64)  # 1 = M
    return {"age": np.round(age, 1), "sex": sex, "diagnosis": dx}


def _simulate_chunk(
    rng: np.random.Generator,
    model: _Model,
    spec: SiteSpec,
    ph: dict[str, np.ndarray],
    eff: Effects,
    mechanism: str = "mixed",
    mech_rng: np.random.Generator | None = None,
) -> np.ndarray:
    """BOLD-like series for a chunk of B subjects -> (B, R, L) float32. `mech_rng`: the mechanism's draws."""
    b = ph["age"].shape[0]
    n, tr = spec.n_frames, spec.tr
    r, k = model.loadings.shape
    nets = model.conn.networks  # (R,)
    n_net = int(nets.max()) + 1
    mixed = mechanism == "mixed"
    h = hrf(tr)
    # latent factors: OU with per-factor timescales
    phi_f = np.exp(-tr / model.factor_tau)[None, :]  # (1, K)
    f = _filtered_noise(rng, (b, k), phi_f, h, n)  # (B, K, L)
    # network drivers: patients slower in the diagnosis network; sex slows one of two networks
    tau_d = np.full((b, n_net), eff.driver_tau)
    if mixed:
        tau_d[:, eff.dx_network] *= np.where(ph["diagnosis"] > 0, eff.dx_slow, 1.0)
        tau_d[:, eff.sex_networks[0]] *= np.where(ph["sex"] > 0, eff.sex_slow, 1.0)
        tau_d[:, eff.sex_networks[1]] *= np.where(ph["sex"] > 0, 1.0, eff.sex_slow)
    elif mechanism == "spectrum":
        tau_d = mech.spectrum_timescales(ph, eff, n_net)  # (B, N_net)
    d = _filtered_noise(rng, (b, n_net), np.exp(-tr / tau_d), h, n)  # (B, N_net, L)
    u = _filtered_noise(rng, (b, r), np.full((1, 1), np.exp(-tr / 1.0)), h, n)  # (B, R, L)
    # amplitudes
    fa = np.exp(rng.normal(0.0, eff.subject_factor_sd, (b, k)))  # (B, K)
    if spec.population == "B":
        fa = fa * model.pop_b_gain
    da = eff.driver_amplitude * np.exp(rng.normal(0.0, eff.subject_driver_sd, (b, n_net)))  # (B, N_net)
    years = ph["age"] - 60.0
    amp = noise_u = np.ones(b)  # (B,)
    if mixed:
        m, fe = ph["sex"], eff.sex_networks
        da[:, fe[0]] *= 1.0 + eff.sex_gain * m
        da[:, fe[1]] *= 1.0 + eff.sex_gain * (1.0 - m)
        da[:, eff.dx_network] *= np.where(ph["diagnosis"] > 0, 1.0 - eff.dx_weaken, 1.0)
        da[:, eff.dx_boost_network] *= np.where(ph["diagnosis"] > 0, 1.0 + eff.dx_boost, 1.0)
        amp = np.clip(1.0 + eff.age_amplitude * years, 0.5, None)  # (B,)
        noise_u = np.clip(1.0 + eff.age_noise * years, 0.5, None)  # (B,)
    if spec.population == "B":
        da[:, list(eff.pop_b_networks)] *= eff.pop_b_driver_gain
    if mechanism == "coupling":  # one shared process per label, like a driver: same timescale and HRF
        c = _filtered_noise(mech_rng, (b, 2), np.full((1, 1), np.exp(-tr / eff.driver_tau)), h, n)  # (B, 2, L)
        d = mech.couple_drivers(d, c, mech.coupling_weights(mech_rng, ph, eff), eff)
    f32 = np.float32
    s = model.loadings.astype(f32) @ (fa.astype(f32)[:, :, None] * f)  # (R, K) @ (B, K, L) -> (B, R, L)
    s += da.astype(f32)[:, nets, None] * d[:, nets, :]  # (B, R, L) network drivers
    s += (model.resid[None, :] * noise_u[:, None]).astype(f32)[:, :, None] * u
    s *= amp.astype(f32)[:, None, None]
    s += spec.noise * rng.standard_normal(s.shape, dtype=np.float32)  # thermal noise (white)
    # motion spikes: a global jump of a few signal SDs, ROI-varying amplitude
    spikes = (rng.random((b, n)) < spec.spike_rate) * rng.choice([-1.0, 1.0], (b, n)) * rng.uniform(2.0, 5.0, (b, n))
    s += spikes.astype(f32)[:, None, :] * rng.uniform(0.5, 1.0, (b, r, 1)).astype(f32)
    s += rng.normal(0.0, 0.5, (b, r, 1)).astype(f32) * np.linspace(-1.0, 1.0, n, dtype=f32)  # slow drift
    if mechanism == "amplitude":  # every fluctuation of a ROI scaled: correlations exactly unchanged
        s *= mech.amplitude_gains(ph, eff, nets).astype(f32)[:, :, None]
    # intensities: ROI baseline x subject x site gain; fluctuations ~1 % of it
    base = model.baseline[None, :] * spec.gain * np.exp(rng.normal(0.0, 0.05, (b, 1)))
    base = base * (1.0 + 0.03 * rng.standard_normal((b, r)))  # (B, R)
    if spec.population == "B":
        base *= eff.pop_b_baseline
    s *= f32(0.01)
    s += f32(1.0)
    s *= base.astype(f32)[:, :, None]
    return s  # (B, R, L) float32


def _site_yaml(
    spec: SiteSpec, n_rois: int, n_sub: int, seed: int, split: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> dict:
    return {
        "site": spec.name,
        "data": {"format": "roi", "root": ".", "file": "roi/{subject}.npy", "orientation": "rois_x_time"},
        "tr": spec.tr,
        "rois": [{"name": "subcortex", "n_rois": n_sub}, {"name": "cortex", "n_rois": n_rois - n_sub}],
        "participants": {"file": "participants.tsv", "phenotypes": ["age", "sex", "diagnosis", "population"]},
        "split": {"train": split[0], "val": split[1], "test": split[2], "seed": seed},
        "device": "cpu",
    }


def generate_site(
    out_dir: str | Path,
    spec: SiteSpec,
    n_subjects: int,
    seed: int,
    site_index: int,
    model: _Model,
    effects: Effects | None = None,
    chunk: int = 16,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    mechanism: str = "mixed",
    version: int = GENERATOR_VERSION,
) -> Path:
    """Generate and write one site; returns its YAML path."""
    mech.check_mechanism(mechanism, version)
    version = int(version)
    effects = effects_for_version(version) if effects is None else effects
    site_dir = Path(out_dir) / spec.name
    rng = np.random.default_rng([seed, site_index])
    mech_rng = np.random.default_rng([seed, site_index, 1])  # the mechanism's own draws
    ph = _phenotypes(rng, n_subjects, spec.population)
    tag = spec.name.replace("_", "")
    ids = [f"sub-{tag}{i:04d}" for i in range(n_subjects)]
    for lo in range(0, n_subjects, chunk):  # chunks of subjects, vectorised inside
        sl = slice(lo, min(lo + chunk, n_subjects))
        ph_b = {k: v[sl] for k, v in ph.items()}
        x = _simulate_chunk(rng, model, spec, ph_b, effects, mechanism, mech_rng)  # (B, R, L)
        for j, sid in enumerate(ids[sl]):
            write_roi_npy(site_dir / "roi" / f"{sid}.npy", x[j])
    cols = {**ph, "population": np.array([spec.population] * n_subjects), "site": np.array([spec.name] * n_subjects)}
    write_participants(site_dir / "participants.tsv", ids, cols)
    n_rois = model.loadings.shape[0]
    cfg = _site_yaml(spec, n_rois, model.conn.n_subcortical, seed, split)
    yml = site_dir / f"{spec.name}.yaml"
    header = (
        f"# Generated by `brainjepa synth` (seed {seed}, generator version {version}, mechanism {mechanism});"
        " a valid site config for this folder.\n"
    )
    tmp = yml.with_name(yml.name + ".tmp")
    tmp.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
    tmp.replace(yml)
    meta = {
        "generator": "sites.synth",
        "seed": seed,
        "generator_version": version,
        "mechanism": mechanism,
        "site_index": site_index,
        "spec": dataclasses.asdict(spec),
        "effects": dataclasses.asdict(effects),
        "effects_changed": _changed(effects, effects_for_version(version)),
        "n_subjects": n_subjects,
        "n_rois": n_rois,
        "n_subcortical": model.conn.n_subcortical,
        "networks": model.conn.networks.tolist(),
        "connectivity": "BrainSpace Schaefer group FC (main) + generated subcortical block",
    }
    (site_dir / "synth.json").write_text(json.dumps(meta, indent=1))
    return yml


def generate_cohorts(
    out_dir: str | Path,
    n_sites: int = 3,
    subjects_per_site: int | list[int] = 100,
    seed: int = 0,
    n_rois: int = 450,
    n_subcortical: int | None = None,
    duration_s: float | None = None,
    sites: list[SiteSpec] | None = None,
    effects: Effects | None = None,
    n_factors: int = 60,
    progress: bool = False,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    only: tuple[str, ...] = (),
    mechanism: str = "mixed",
    version: int = GENERATOR_VERSION,
) -> list[Path]:
    """Write `n_sites` generated sites under `out_dir`; returns their site YAML paths.

    `only` (site names) writes just those sites of the cohort: a site's draws depend on the seed and its
    index only, so they are the same files as in the full cohort (e.g. new sites of the population a
    federation was generated from, `make demo`).

    `n_rois` includes the subcortical block (default R/9: 50 of 450). `duration_s` overrides every
    preset's scan length (e.g. 120 s for quick tests). `sites` replaces the presets entirely.
    Deterministic: the same arguments give byte-identical files.

    `mechanism` (one of `MECHANISMS`) says what carries the labels (`sites.mechanisms`); `version`
    reproduces an earlier generator exactly (`effects` None: that version's `Effects` defaults; a
    mechanism newer than `version` is a `ConfigError`).
    """
    mech.check_mechanism(mechanism, version)
    version = int(version)
    effects = effects_for_version(version) if effects is None else effects
    specs = sites if sites is not None else default_site_specs(n_sites, duration_s)
    counts = [subjects_per_site] * len(specs) if isinstance(subjects_per_site, int) else list(subjects_per_site)
    if len(counts) != len(specs):
        raise DataError(f"synth: {len(specs)} sites but {len(counts)} subject counts")
    if min(counts) < 1:
        raise DataError(f"synth: every site needs at least one subject, got {counts}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise DataError(f"synth: site names must be unique, got {names}")
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise DataError(f"synth: --only {unknown}: not sites of this {len(names)}-site cohort {names}")
    from threadpoolctl import threadpool_limits  # BLAS threads thrash on small shared machines

    it = [(i, sc) for i, sc in enumerate(zip(specs, counts, strict=True)) if not only or sc[0].name in only]
    n_written = sum(n for _, (_, n) in it)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="synth sites", unit="site")
    with threadpool_limits(limits=1):
        model = _build_model(n_rois, n_subcortical, n_factors, seed, effects)
        mech.check_effects(effects, int(model.conn.networks.max()) + 1, mechanism)
        paths = [
            generate_site(out_dir, spec, n, seed, i, model, effects, split=split, mechanism=mechanism, version=version)
            for i, (spec, n) in it
        ]
    log.info(
        "synth: wrote %d sites (%d subjects, generator version %d, mechanism %s) under %s",
        len(paths),
        n_written,
        version,
        mechanism,
        out_dir,
    )
    return paths


def _changed(effects: Effects, base: Effects) -> dict:
    """The fields of `effects` that differ from `base` (the `--effect` overrides), as JSON values."""
    a, b = dataclasses.asdict(effects), dataclasses.asdict(base)
    return {k: v for k, v in a.items() if v != b[k]}


def read_generator_record(site_dir: str | Path) -> dict | None:
    """A generated site's `synth.json` (its generation parameters), or None for a real site (no such file).

    `site_dir` is the site folder or its YAML. Records written before versions were recorded get
    `generator_version` None and `mechanism` "mixed" (the only one then)."""
    site_dir = Path(site_dir)
    path = (site_dir.parent if site_dir.is_file() else site_dir) / "synth.json"
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"file '{path}': expected the generator's JSON record, got invalid JSON ({e})") from e
    if not isinstance(rec, dict) or rec.get("generator") != "sites.synth":
        raise DataError(f"file '{path}': expected a record with generator 'sites.synth', got {str(rec)[:80]!r}")
    rec.setdefault("generator_version", None)
    rec.setdefault("mechanism", "mixed")
    return rec
