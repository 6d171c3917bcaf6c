"""`brainjepa-client` refuses a bad site YAML before it joins anything (nothing is started)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from client.cli import app

SITE = """site: site_x
tr: 0.8
data: {format: roi, root: data, file: "{subject}.npy"}
rois: [{name: ctx, n_rois: 10}]
"""


def test_privacy_without_a_budget_is_refused_at_start_naming_file_and_key(tmp_path: Path) -> None:
    site = tmp_path / "site_x.yaml"
    site.write_text(SITE + "privacy: {enabled: true, delta: 1.0e-5}\n")
    res = CliRunner().invoke(app, ["--site", str(site), "--gradients", str(tmp_path / "g.npy"), "--insecure"])
    assert res.exit_code == 2
    assert str(site) in res.output and "privacy.target_epsilon" in res.output and "SuperNode log" not in res.output


def test_a_runtime_typo_is_refused_too(tmp_path: Path) -> None:
    site = tmp_path / "site_x.yaml"
    site.write_text(SITE + "perf: {compil: true}\n")
    res = CliRunner().invoke(app, ["--site", str(site), "--gradients", str(tmp_path / "g.npy"), "--insecure"])
    assert res.exit_code == 2 and "perf.compil" in res.output and "unknown key" in res.output
