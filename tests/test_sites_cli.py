"""`prepare`, `gradients`, `synth` through typer's CliRunner on an app we register them onto."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from brainjepa import data_cli
from brainjepa.gradients import load_gradients

runner = CliRunner()


@pytest.fixture(scope="module")
def app():
    a = typer.Typer()
    data_cli.register(a)
    return a


def test_help_texts(app):
    for cmd, words in (("prepare", "NiftiLabelsMasker"), ("gradients", "diffusion map"), ("synth", "multi-site")):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and words in r.output


@pytest.fixture(scope="module")
def synth_sites(app, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    r = runner.invoke(
        app,
        [
            "synth",
            "--out",
            str(out),
            "--sites",
            "2",
            "--subjects",
            "10",
            "--rois",
            "60",
            "--duration",
            "300",
            "--seed",
            "3",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    return out, [line for line in r.output.split() if line.endswith(".yaml")]


def test_synth_then_site_and_federated_gradients(app, synth_sites, tmp_path):
    out, yamls = synth_sites
    assert len(yamls) == 2
    # each site exports its FC contribution; the coordinator combines them
    sums = []
    for i, y in enumerate(yamls):
        s = tmp_path / f"fc{i}.npz"
        r = runner.invoke(
            app,
            [
                "gradients",
                "--site",
                y,
                "--export-fc-sum",
                str(s),
                "--out",
                str(tmp_path / f"g{i}.npy"),
                "--n-components",
                "10",
            ],
        )
        assert r.exit_code == 0, r.output
        sums.append(str(s))
    r = runner.invoke(
        app,
        [
            "gradients",
            "--fc-sum",
            sums[0],
            "--fc-sum",
            sums[1],
            "--out",
            str(tmp_path / "fed.npy"),
            "--n-components",
            "10",
            "--plot",
            str(tmp_path / "fed.png"),
        ],
    )
    assert r.exit_code == 0, r.output
    r2 = runner.invoke(
        app,
        [
            "gradients",
            "--site",
            yamls[0],
            "--site",
            yamls[1],
            "--out",
            str(tmp_path / "both.npy"),
            "--n-components",
            "10",
        ],
    )
    assert r2.exit_code == 0, r2.output
    fed, both = (load_gradients(tmp_path / "fed.npy", n_rois=60), load_gradients(tmp_path / "both.npy", n_rois=60))
    np.testing.assert_allclose(fed, both, atol=1e-5)
    meta = json.loads((tmp_path / "fed.npy.json").read_text())
    assert meta["source"].startswith("federation of 2 site FC sums") and meta["n_components"] == 10
    assert (tmp_path / "fed.png").stat().st_size > 5000
    # aligned to a reference: stays close to it
    r = runner.invoke(
        app,
        [
            "gradients",
            "--site",
            yamls[1],
            "--out",
            str(tmp_path / "al.npy"),
            "--n-components",
            "10",
            "--align-to",
            str(tmp_path / "fed.npy"),
        ],
    )
    assert r.exit_code == 0, r.output
    al = load_gradients(tmp_path / "al.npy")
    assert abs(np.corrcoef(al[:, 0], fed[:, 0])[0, 1]) > 0.8


def test_gradients_errors(app, tmp_path):
    r = runner.invoke(app, ["gradients", "--out", str(tmp_path / "g.npy")])
    assert r.exit_code == 2 and "exactly one source" in r.output
    np.save(tmp_path / "fc.npy", np.zeros((5, 4)))
    r = runner.invoke(app, ["gradients", "--fc", str(tmp_path / "fc.npy"), "--out", str(tmp_path / "g.npy")])
    assert r.exit_code == 2 and "fc.npy" in r.output and "square" in r.output
    r = runner.invoke(
        app,
        [
            "gradients",
            "--schaefer400",
            "--out",
            str(tmp_path / "g.npy"),
            "--n-components",
            "5",
            "--align-to",
            str(tmp_path / "nope.npy"),
        ],
    )
    assert r.exit_code == 2 and "nope.npy" in r.output


def test_schaefer400_default(app, tmp_path):
    r = runner.invoke(app, ["gradients", "--schaefer400", "--out", str(tmp_path / "s.csv")])
    assert r.exit_code == 0, r.output
    assert load_gradients(tmp_path / "s.csv", n_rois=400, n_components=30).shape == (400, 30)


@pytest.mark.usefixtures("gc_frozen")  # nilearn collects garbage at every image read
def test_prepare_command(app, tmp_path):
    import yaml
    from test_sites_prepare import build, site_raw

    cfg, truth = build(tmp_path, n_sub=2)
    raw = site_raw()
    y = tmp_path / "site.yaml"
    y.write_text(yaml.safe_dump(raw))
    r = runner.invoke(app, ["prepare", "--site", str(y), "--no-progress", "--min-frames", "30", "--model-tr", "2.0"])
    assert r.exit_code == 0, r.output
    assert (
        "2 subject(s) ready, 0 failed, 1 too short" not in r.output
        and "2 subject(s) ready, 0 failed, 0 too short" in r.output
    )
    np.testing.assert_allclose(np.load(cfg.output_dir / "sub-01.npy"), truth["sub-01"], rtol=1e-6)
    r = runner.invoke(app, ["prepare", "--site", str(y), "--no-progress", "--min-frames", "60", "--model-tr", "2.0"])
    assert "2 too short" in r.output
    y.write_text("site: [oops\n")
    r = runner.invoke(app, ["prepare", "--site", str(y)])
    assert r.exit_code == 2 and "malformed YAML" in r.output and str(y) in r.output


@pytest.mark.usefixtures("gc_frozen")  # nilearn collects garbage at every image read
def test_prepare_with_a_relative_site_path_then_load(app, tmp_path, monkeypatch):
    """`prepare --site <dir>/site.yaml` from the folder above writes under the YAML's data root once, and
    the prepared site loads from any working directory."""
    import yaml
    from test_sites_prepare import build, site_raw

    from sites.cohort import load_site_series
    from sites.config import load_site_config

    _, truth = build(tmp_path, n_sub=2)
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(site_raw()))
    monkeypatch.chdir(tmp_path.parent)
    rel = f"{tmp_path.name}/site.yaml"
    r = runner.invoke(app, ["prepare", "--site", rel, "--no-progress"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "derivatives" / "fmriprep" / "derivatives" / "brainjepa"
    assert (out / "manifest.json").is_file() and str(out) in r.output
    assert not (tmp_path.parent / tmp_path.name / "derivatives" / "fmriprep" / tmp_path.name).exists()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_site_config("../site.yaml")
    assert cfg.output_dir == out
    ss = load_site_series(cfg, model_tr=2.0)
    np.testing.assert_allclose(ss.series[1], truth["sub-01"], rtol=1e-6)
