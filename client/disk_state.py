"""A site's optimizer state on its own disk, so that it survives a coordinator restart.

Flower keeps `context.state` per run: a coordinator that crashes and resumes submits a NEW run, and the
site's AdamW moments would start afresh. After each pretraining round the site also writes its optimizer
state (moments, step counts, the torch RNG) to `<site output>/federation-state/<model checksum>.pt`
(owner-only, write-then-rename, loadable with `torch.load(weights_only=True)`), with the step the round
ended at. A round whose context holds no state takes the file only if it continues exactly where the file
ended (same model and gradient checksums, its first step == the file's last step): a resumed coordinator
gets the moments; a new run, or a rollback to an earlier round, starts afresh.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from brainjepa.checkpoint import atomic_save
from brainjepa.federation.contract import RoundSpec
from sites.config import SiteConfig

log = logging.getLogger(__name__)


def state_path(site: SiteConfig, spec: RoundSpec) -> Path:
    return site.output_dir / "federation-state" / f"{spec.model_checksum[:32]}.pt"


def save_state(site: SiteConfig, spec: RoundSpec, optimizer: torch.optim.Optimizer, rounds_done: int) -> None:
    """Write the file; a site whose output folder is not writable only loses this (a warning)."""
    path = state_path(site, spec)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _save(path, spec, optimizer, rounds_done)
    except OSError as e:
        log.warning("optimizer state not kept on disk (%s): a coordinator restart will reset its moments", e)


def _save(path: Path, spec: RoundSpec, optimizer: torch.optim.Optimizer, rounds_done: int) -> Path:
    return atomic_save(
        {
            "model-checksum": spec.model_checksum,
            "gradient-checksum": spec.gradient_checksum,
            "step-end": spec.step_start + spec.local_steps,
            "rounds-done": rounds_done,
            "optimizer": optimizer.state_dict(),
            "torch-rng": torch.get_rng_state(),
        },
        path,
    )


def load_state(site: SiteConfig, spec: RoundSpec, optimizer: torch.optim.Optimizer) -> int:
    """Restore the optimizer (and RNG) from disk if the file continues this round; rounds done (0: fresh)."""
    path = state_path(site, spec)
    if spec.step_start == 0 or not path.is_file():
        return 0
    saved = torch.load(path, map_location="cpu", weights_only=True)
    same = (
        saved.get("model-checksum") == spec.model_checksum
        and saved.get("gradient-checksum") == spec.gradient_checksum
        and int(saved.get("step-end", -1)) == spec.step_start
    )
    if not same:
        log.info(
            "optimizer state %s ends at step %s, this round starts at %d: AdamW moments start afresh",
            path,
            saved.get("step-end"),
            spec.step_start,
        )
        return 0
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch-rng"])
    log.info("optimizer state restored from %s (after %d rounds)", path, int(saved["rounds-done"]))
    return int(saved["rounds-done"])
