"""Bad input gets a clear error naming the file, the field, what was expected and what came."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from brainjepa.config import DataConfig, ModelConfig, PretrainConfig, TrainConfig, load_pretrain_config
from brainjepa.errors import ConfigError, DataError
from brainjepa.gradients import load_gradients
from brainjepa.jepa import JEPAModels
from brainjepa.pretrain import pretrain

REFERENCE_GRADIENTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "gradient_mapping_450.csv"


def test_bad_gradient_files(tmp_path: Path) -> None:
    text = tmp_path / "g.csv"
    text.write_text("roi,g1\n1,2\n")
    with pytest.raises(DataError, match=r"g\.csv.*headerless numeric CSV"):
        load_gradients(text)
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((10, 3), np.nan))
    with pytest.raises(DataError, match=r"nan\.npy.*NaN"):
        load_gradients(nan)
    with pytest.raises(DataError, match=r"missing\.npy.*does not exist"):
        load_gradients(tmp_path / "missing.npy")
    wrong = tmp_path / "g.txt"
    wrong.write_text("1,2")
    with pytest.raises(DataError, match=r"expected a \.npy or \.csv"):
        load_gradients(wrong)


def test_pickled_and_truncated_gradient_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"pickled\.npy.*not a readable numeric \.npy matrix.*allow_pickle"):
        load_gradients(pickled)
    good = tmp_path / "good.npy"
    np.save(good, np.random.default_rng(0).normal(size=(20, 3)))
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(DataError, match=r"truncated\.npy.*not a readable numeric"):
        load_gradients(truncated)


def test_gradient_shape_mismatches_name_both_sides(tmp_path: Path) -> None:
    path = tmp_path / "g.npy"
    np.save(path, np.random.default_rng(0).normal(size=(40, 5)))
    with pytest.raises(DataError, match=r"g\.npy.*40 rows.*data has 32 ROIs"):
        load_gradients(path, n_rois=32)
    with pytest.raises(DataError, match=r"5 columns.*gradient_components.*asks for 30"):
        load_gradients(path, n_rois=40, n_components=30)
    assert load_gradients(path, 40, 3).shape == (40, 3)
    with pytest.raises(ValueError, match=r"model config expects \(32, 5\)"):
        JEPAModels(ModelConfig(size="tiny", n_rois=32, n_frames=32, gradient_components=5), torch.zeros(40, 5))


def _one_step(roi_dir: Path, out: Path, n_rois: int = 32, scaling: str = "none") -> PretrainConfig:
    """A one-step tiny pretraining config on the fixture's folder of ROI series."""
    return PretrainConfig(
        model=ModelConfig(size="tiny", n_rois=n_rois, n_frames=64, gradient_components=8),
        data=DataConfig(roi_dir=str(roi_dir), scaling=scaling),
        train=TrainConfig(steps=1, batch_size=4, out_dir=str(out)),
    )


def test_wrong_roi_count_between_data_and_model(roi_dir: Path, tmp_path: Path) -> None:
    cfg = _one_step(roi_dir, tmp_path, n_rois=450)
    with pytest.raises(DataError, match=r"has 32 ROIs but model.n_rois is 450"):
        pretrain(cfg, progress=False)


def test_nan_in_data_names_the_subject(roi_dir: Path, tmp_path: Path) -> None:
    bad = np.load(roi_dir / "sub-005.npy")
    bad[3, 10] = np.nan
    np.save(roi_dir / "sub-005.npy", bad)
    cfg = _one_step(roi_dir, tmp_path, scaling="robust")
    with pytest.raises(DataError, match=r"sub-005.*NaN"):
        pretrain(cfg, progress=False)


def test_robust_scaling_of_demeaned_series_is_refused(roi_dir: Path, tmp_path: Path) -> None:
    cfg = _one_step(roi_dir, tmp_path, scaling="robust")
    with pytest.raises(DataError, match=r"rois.*already demeaned.*data.scaling: values"):
        pretrain(cfg, progress=False)


def test_malformed_config_keys_and_types(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  size: tiny\n  n_roi: 32\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*model\.n_roi.*unknown key.*n_rois"):
        load_pretrain_config(path)
    path.write_text("train:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*train\.steps.*expected an integer.*'many'"):
        load_pretrain_config(path)
    path.write_text("mask:\n  alpha_roi_scale: 0.5\n")
    with pytest.raises(ConfigError, match=r"mask\.alpha_roi_scale.*list of 2"):
        load_pretrain_config(path)
    path.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*not valid YAML"):
        load_pretrain_config(path)
    path.write_text("model:\n  size: huge\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*model\.size.*huge"):
        load_pretrain_config(path)


@pytest.mark.skipif(not REFERENCE_GRADIENTS.is_file(), reason="reference gradient file not beside the project")
def test_reference_gradient_file_loads_into_a_vit_base() -> None:
    g = load_gradients(REFERENCE_GRADIENTS, n_rois=450, n_components=30)
    assert g.shape == (450, 30)
    norms = np.linalg.norm(g, axis=0)
    assert norms[0] > norms[2] > norms[10]  # components ordered by decreasing norm
    models = JEPAModels(ModelConfig(size="tiny", n_rois=450, n_frames=160), torch.from_numpy(g))
    pe = models.encoder.pos_embed()
    assert pe.shape == (4500, models.cfg.embed_dim)
