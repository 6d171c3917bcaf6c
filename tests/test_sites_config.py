"""Site YAML schema: valid files parse into frozen dataclasses; bad ones name the file and key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from brainjepa.config import load_site
from brainjepa.errors import ConfigError
from sites.config import RUNTIME_KEYS, load_site_config, parse_site_config, site_config_to_dict

ROI_YAML = """\
site: site_x
data:
  format: roi
  root: data
  file: "{subject}/{subject}_rois.npy"
  orientation: time_x_rois
tr: 0.8
rois:
  - {name: tian_s3, n_rois: 50}
  - {name: schaefer400, n_rois: 400}
participants:
  file: participants.tsv
  phenotypes: [age, sex]
split: {train: 0.7, val: 0.15, test: 0.15, seed: 3}
device: cpu
"""

NIFTI_YAML = """\
site: site_n
data:
  format: nifti
  root: bids
  confounds: "{subject}/func/{subject}_*desc-confounds_timeseries.tsv"
rois:
  - {name: sub, n_rois: 2, atlas: atlases/sub.nii.gz}
  - {name: ctx, n_rois: 3, atlas: atlases/ctx.nii.gz, labels: [3, 1, 2]}
preprocess: {detrend: true, high_pass: 0.01, confound_columns: [trans_x]}
"""


def write(tmp_path: Path, text: str, name: str = "site.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_roi_config_parses_and_resolves_paths(tmp_path):
    cfg = load_site_config(write(tmp_path, ROI_YAML))
    assert cfg.site == "site_x" and cfg.data.format == "roi" and cfg.tr == 0.8
    assert cfg.n_rois == 450 and cfg.roi_names[0] == "tian_s3_0" and cfg.roi_names[50] == "schaefer400_0"
    assert cfg.data.root == tmp_path / "data"
    assert cfg.participants.file == tmp_path / "data" / "participants.tsv"
    assert cfg.participants.phenotypes == ("age", "sex")
    assert cfg.split.seed == 3
    same, runtime = load_site(tmp_path / "site.yaml")  # the whole file: data + how the site trains
    assert same == cfg and runtime.device == "cpu" and not runtime.privacy.enabled
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tr = 2.0  # type: ignore[misc]
    # round trip through the YAML-ready mapping
    d = site_config_to_dict(cfg)
    assert d["rois"][1] == {"name": "schaefer400", "n_rois": 400, "atlas": None, "labels": None, "file": None}


def test_nifti_config_parses(tmp_path):
    cfg = load_site_config(write(tmp_path, NIFTI_YAML))
    assert cfg.tr is None and cfg.data.format == "nifti"
    assert cfg.rois[1].labels == (3, 1, 2) and cfg.rois[0].atlas == tmp_path / "atlases/sub.nii.gz"
    assert cfg.preprocess.detrend and cfg.preprocess.high_pass == 0.01
    assert cfg.output_dir == tmp_path / "bids" / "derivatives" / "brainjepa"


@pytest.mark.parametrize(
    "edit, key, what",
    [
        (("device: cpu", "device: cpu\nbatchsize: 4"), "batchsize", "unknown key"),
        (("  orientation: time_x_rois", "  orientation: time_x_rois\n  fromat: roi"), "data.fromat", "unknown key"),
        (("device: cpu", "device: 1"), "device", "expected a string"),
        (("tr: 0.8", "tr: fast"), "tr", "expected a number"),
        (("tr: 0.8", "tr: true"), "tr", "expected a number"),
        (("  format: roi", "  format: csv"), "data.format", "one of 'nifti', 'roi'"),
        (
            ("  - {name: tian_s3, n_rois: 50}", "  - {name: tian_s3, n_rois: 5.5}"),
            "rois[0].n_rois",
            "expected an integer",
        ),
        (("  phenotypes: [age, sex]", "  phenotypes: age"), "participants.phenotypes", "a list of"),
        (("site: site_x\n", ""), "site", "required key is missing"),
        (("tr: 0.8", "tr: -1"), "tr", "> 0"),
        (("tr: 0.8\n", ""), "tr", "no header to read the TR"),
        (
            ("split: {train: 0.7, val: 0.15, test: 0.15, seed: 3}", "split: {train: 0.7, val: 0.5, test: 0.1}"),
            "split",
            "sum to 1",
        ),
        (('  file: "{subject}/{subject}_rois.npy"', '  file: "rois.npy"'), "data.file", "must contain"),
        (("device: cpu", "device: cpu\nperf: {compile: maybe}"), "perf.compile", "expected true/false"),
    ],
)
def test_bad_keys_and_types_name_file_and_key(tmp_path, edit, key, what):
    p = write(tmp_path, ROI_YAML.replace(*edit))
    with pytest.raises(ConfigError) as e:
        load_site(p)
    msg = str(e.value)
    assert str(p) in msg and f"'{key}'" in msg and what in msg


def test_nifti_block_without_atlas_is_an_error(tmp_path):
    p = write(tmp_path, NIFTI_YAML.replace(", atlas: atlases/sub.nii.gz", ""))
    with pytest.raises(ConfigError, match=r"rois\[0\]\.atlas"):
        load_site_config(p)


def test_labels_count_must_match(tmp_path):
    p = write(tmp_path, NIFTI_YAML.replace("labels: [3, 1, 2]", "labels: [3, 1]"))
    with pytest.raises(ConfigError, match=r"rois\[1\]\.labels.*2 labels but n_rois is 3"):
        load_site_config(p)


def test_malformed_yaml_and_missing_file(tmp_path):
    p = write(tmp_path, "site: [unclosed\n  data: {")
    with pytest.raises(ConfigError, match="malformed YAML") as e:
        load_site_config(p)
    assert str(p) in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_site_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level"):
        load_site_config(write(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(ConfigError, match="reserved"):
        parse_site_config({"source": "x", "site": "a"}, tmp_path / "s.yaml")


def test_shipped_example_configs_parse():
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("site_*.yaml"))
    assert files, "configs/site_*.yaml examples are missing"
    formats = {load_site(f)[0].data.format for f in files}  # the whole file, runtime sections included
    assert formats == {"roi", "nifti"}


def test_perf_section_sets_this_sites_speed_switches(tmp_path):
    _, runtime = load_site(write(tmp_path, ROI_YAML + "perf: {compile: true, attention: cudnn}\n"))
    assert runtime.perf.compile and runtime.perf.attention == "cudnn" and not runtime.perf.cuda_graphs
    p = write(tmp_path, ROI_YAML + "perf: {attention: fastest}\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"file '.*bad.yaml'.*perf.attention.*fastest"):
        load_site(p)


def test_runtime_sections_are_the_training_sides(tmp_path):
    """`sites` parses the data description and passes the runtime keys on; the training side checks them."""
    p = write(tmp_path, ROI_YAML + "perf: {compile: maybe}\n")
    assert load_site_config(p).site == "site_x"  # data commands (prepare, synth) do not need them
    with pytest.raises(ConfigError, match="perf.compile"):
        load_site(p)
    assert set(RUNTIME_KEYS) == {"device", "perf", "privacy", "distributed"}


@pytest.mark.parametrize("reader", [load_site, load_site_config], ids=["load_site", "load_site_config"])
def test_a_site_batch_size_is_an_error_saying_what_to_use(tmp_path, reader):
    """A site's `batch_size` was never read: a file that sets it is refused (data commands included), the
    message naming the file, the key and what sets the batch size instead."""
    p = write(tmp_path, ROI_YAML + "batch_size: 16\n")
    with pytest.raises(ConfigError) as e:
        reader(p)
    msg = str(e.value)
    assert str(p) in msg and "'batch_size'" in msg and "not read" in msg
    assert "'batch-size'" in msg and "train.batch_size" in msg  # what to use instead


def test_privacy_enabled_needs_a_budget_naming_file_and_key(tmp_path):
    """DP-SGD without a budget is refused (the file and the key are named); with one it is read as given."""
    p = write(tmp_path, ROI_YAML + "privacy: {enabled: true}\n")
    with pytest.raises(ConfigError) as e:
        load_site(p)
    msg = str(e.value)
    assert str(p) in msg and "privacy.target_epsilon" in msg
    _, runtime = load_site(write(tmp_path, ROI_YAML + "privacy: {enabled: true, target_epsilon: 8}\n", "on.yaml"))
    assert runtime.privacy.enabled and runtime.privacy.target_epsilon == 8 and runtime.privacy.noise_multiplier is None
    _, runtime = load_site(write(tmp_path, ROI_YAML + "privacy: {enabled: false}\n", "off.yaml"))
    assert not runtime.privacy.enabled


def test_relative_site_path_resolves_once_from_any_working_directory(tmp_path, monkeypatch):
    """Every path of a parsed config is absolute, against the YAML's folder; `output_dir` joins nothing again."""
    conf = tmp_path / "configs"
    conf.mkdir()
    text = NIFTI_YAML.replace("root: bids", "root: ../bids\n  output: derivatives/brainjepa")
    absolute = load_site_config(write(conf, text))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    relative = load_site_config(Path("..") / "configs" / "site.yaml")
    monkeypatch.chdir(tmp_path)
    from_parent = load_site_config(Path("configs/site.yaml"))
    for cfg in (absolute, relative, from_parent):
        assert cfg.data.root == tmp_path / "bids"
        assert cfg.output_dir == tmp_path / "bids" / "derivatives" / "brainjepa"
        assert str(cfg.output_dir).count(str(tmp_path / "bids")) == 1
        assert cfg.participants.file == tmp_path / "bids" / "participants.tsv"
        assert [b.atlas for b in cfg.rois] == [conf / "atlases" / "sub.nii.gz", conf / "atlases" / "ctx.nii.gz"]
        paths = [cfg.data.root, cfg.data.output, cfg.output_dir, cfg.participants.file] + [b.atlas for b in cfg.rois]
        assert all(p.is_absolute() for p in paths)
    assert relative == absolute == from_parent


def test_roi_tr_outside_plausible_range_names_file_and_key(tmp_path):
    for bad in ("735", "0.05", "12.0"):
        p = write(tmp_path, ROI_YAML.replace("tr: 0.8", f"tr: {bad}"), f"bad_{bad}.yaml")
        with pytest.raises(ConfigError) as e:
            load_site_config(p)
        msg = str(e.value)
        assert str(p) in msg and "field 'tr'" in msg and bad in msg and "0.3-5.0" in msg
    for ok in ("0.3", "0.72", "5.0"):
        assert load_site_config(write(tmp_path, ROI_YAML.replace("tr: 0.8", f"tr: {ok}"), "ok.yaml")).tr == float(ok)
