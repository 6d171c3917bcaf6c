"""How each generated site acquires its scans: TR, scan length, thermal noise, scanner gain, motion spikes
and the population it samples (`SiteSpec`), and the preset sites the generator cycles through."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class SiteSpec:
    name: str
    tr: float  # seconds
    n_frames: int
    noise: float = 0.4  # thermal noise SD, in units of the structured signal's SD
    gain: float = 1.0  # scanner intensity gain
    spike_rate: float = 0.005  # motion spikes per frame
    population: str = "A"


PRESETS = (
    SiteSpec("site_a", 0.735, 490, noise=0.35, gain=1.00, spike_rate=0.004),  # UKB-like
    SiteSpec("site_b", 2.0, 200, noise=0.50, gain=0.85, spike_rate=0.010),
    SiteSpec("site_c", 2.5, 180, noise=0.45, gain=1.15, spike_rate=0.006),
    SiteSpec("site_d", 1.5, 260, noise=0.40, gain=0.95, spike_rate=0.006),
    SiteSpec("site_e", 0.8, 460, noise=0.55, gain=1.05, spike_rate=0.012),
)


def default_site_specs(n_sites: int, duration_s: float | None = None) -> list[SiteSpec]:
    """Preset sites (cycled); the last of two or more sites is population B."""
    specs = []
    for i in range(n_sites):
        p = PRESETS[i % len(PRESETS)]
        name = p.name if i < len(PRESETS) else f"{p.name}{i // len(PRESETS) + 1}"
        n_frames = p.n_frames if duration_s is None else max(8, int(round(duration_s / p.tr)))
        pop = "B" if (n_sites >= 2 and i == n_sites - 1) else "A"
        specs.append(dataclasses.replace(p, name=name, n_frames=n_frames, population=pop))
    return specs
