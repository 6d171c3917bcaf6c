"""Shared test set-up: a small cohort with real structure (network sources + subject traits), a tiny
generated-cohort protocol, and the order the tests run in (longest modules first, a module together)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import yaml


def structured_cohort(n_subjects: int, n_rois: int, n_frames: int, seed: int = 0, n_sources: int = 4) -> np.ndarray:
    """(N, R, L) float32: R ROIs driven by a few smooth latent sources through a fixed network
    loading, with a subject-specific source gain (a trait the encoder can pick up) and noise."""
    rng = np.random.default_rng(seed)
    loading = rng.normal(size=(n_rois, n_sources)) * (rng.random((n_rois, n_sources)) < 0.5)  # (R, S)
    t = np.arange(n_frames)
    out = np.empty((n_subjects, n_rois, n_frames), dtype=np.float32)
    for i in range(n_subjects):
        freq = rng.uniform(0.02, 0.12, size=n_sources)
        phase = rng.uniform(0, 2 * np.pi, size=n_sources)
        gain = rng.lognormal(0.0, 0.5, size=n_sources)  # the subject's trait
        src = gain[:, None] * np.sin(2 * np.pi * freq[:, None] * t[None] + phase[:, None])  # (S, L)
        x = loading @ src + 0.3 * rng.normal(size=(n_rois, n_frames))
        out[i] = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
    return out


def write_roi_dir(data: np.ndarray, folder: Path) -> Path:
    """One (R, L) .npy file per subject of data (N, R, L): the `data.roi_dir` layout."""
    folder.mkdir(parents=True)
    for i, x in enumerate(data):
        np.save(folder / f"sub-{i:03d}.npy", x)
    return folder


TINY_PRETRAIN = {
    "model": {"size": "tiny", "n_rois": 20, "n_frames": 32, "gradient_components": 8},
    "data": {"scaling": "centered"},
    "train": {"batch_size": 4, "device": "cpu"},
}


def tiny_generated_protocol(root: Path, generate_update: dict | None = None, **edit: object) -> Path:
    """`root/protocol.yaml`: a generated-cohort protocol at the smallest useful size (3 sites x 24 subjects
    x 20 ROIs, two cohorts, a 2-step pretraining from `root/pre.yaml`); `generate_update` updates
    the generator's section, `edit` replaces top-level keys."""
    from sites.synth import GENERATOR_VERSION  # noqa: PLC0415  (conftest imports stay light)

    (root / "pre.yaml").write_text(yaml.safe_dump(TINY_PRETRAIN))
    p = {
        "name": "frozen",
        "pretrain": {"config": "pre.yaml", "steps": 2},
        "seeds": [0],
        "generate": {
            "version": GENERATOR_VERSION,
            "sites": 3,
            "subjects": 24,
            "rois": 20,
            "duration": 200,
            "split": [0.6, 0.2, 0.2],
            "mechanism": "coupling",
            **(generate_update or {}),
        },
        "generator_seeds": [0, 1],
        "sites": [{"name": "site_a"}, {"name": "site_b"}, {"name": "site_c"}],
        "tasks": [{"name": "sex", "column": "sex", "kind": "classification", "classes": ["0", "1"]}],
        "methods": ["random_probe", "roi_spectrum", "fc", "fc_tangent"],
        "recipe": {"eval_windows": 2},
        "n_bootstrap": 200,
        "experiments": [{"name": "held out", "finetune": ["site_a", "site_b"], "test": ["site_c"]}],
    }
    p.update(edit)
    path = root / "protocol.yaml"
    path.write_text(yaml.safe_dump(p))
    return path


@pytest.fixture
def roi_dir(tmp_path: Path) -> Path:
    return write_roi_dir(structured_cohort(24, 32, 96, seed=1), tmp_path / "rois")


@pytest.fixture(autouse=True)
def _scoring_ledger(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test scores into its own ledger (`brainjepa evaluate` refuses a second scoring of a test split)."""
    monkeypatch.setenv("BRAINJEPA_LEDGER", str(tmp_path_factory.mktemp("ledger") / "scored.jsonl"))


def freeze_heap() -> None:
    """Collect garbage once, then move every object alive now out of the collector's reach for the rest
    of the session (`gc.freeze`; they are still freed by reference counting). nilearn calls `gc.collect()`
    at every image read (`safe_get_data`): over the millions of objects the imports (torch, Flower,
    nilearn, sklearn) and earlier tests left, a collection took ~0.15 s, several seconds per extraction
    test; over a frozen heap it scans only what the test itself made."""
    gc.collect()
    gc.freeze()


def pytest_collection_finish(session: pytest.Session) -> None:
    freeze_heap()  # every test module is imported now


@pytest.fixture
def gc_frozen() -> None:
    """For tests that extract with nilearn's masker: what earlier tests left alive is frozen too."""
    freeze_heap()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest modules first, each module's tests together (its longest first), so that the workers
    of `make test` start on the longest work and end together on the short unit tests, instead of one
    worker running a two-minute federation at the end while the other idles; and so that a module-scoped
    fixture (a federation, a pretrained backbone) is built once: pytest tears it down as soon as the next
    test comes from another module. A module's length is its longest test's; `tests/durations.json` holds
    the tests that took >= 10 s (seconds, from `pytest --durations` on 2 cores); within equal lengths,
    integration modules, then slow, then the rest, each in file order.

    `make test` runs with `--dist loadscope --no-loadscope-reorder`: one worker takes a whole module, and
    the modules are handed out in this order."""
    seconds = json.loads((Path(__file__).parent / "durations.json").read_text())

    def lane(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("integration") else 1 if item.get_closest_marker("slow") else 2

    module_rank: dict[str, tuple[float, int]] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        length, best = module_rank.get(module, (0.0, 2))
        module_rank[module] = (min(length, -seconds.get(item.nodeid, 0.0)), min(best, lane(item)))

    def rank(item: pytest.Item) -> tuple[tuple[float, int], str, float]:
        module = item.nodeid.split("::")[0]
        return (module_rank[module], module, -seconds.get(item.nodeid, 0.0))

    items.sort(key=rank)  # stable: file order within a module's equal keys
