"""`brainjepa import-reference`: a checkpoint in the reference code's layout becomes one of ours.

The reference state dicts are built here from the layout facts (docs/model.md, "Importing reference
checkpoints"), with random weights, and the reference forward is written out independently: Conv2d
patch embedding, concat(sin-cos time half, min-max(Linear(g))) positions, pre-LN blocks with plain
matmul-softmax attention, final LayerNorm.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from brainjepa.checkpoint import load_checkpoint
from brainjepa.cli import app
from brainjepa.config import ModelConfig
from brainjepa.errors import DataError
from brainjepa.jepa import JEPAModels
from brainjepa.reference_import import import_reference
from brainjepa.schema import from_mapping
from sites.scaling import RobustScaling

R, T, P, K = 20, 32, 16, 30  # ROIs, frames, patch, gradient components
W = T // P
BLOCK_PARTS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def sincos(dim: int, n: int) -> np.ndarray:
    """[sin | cos] of positions 0..n-1 at frequencies 1 / 10000^(i / (dim/2)): (n, dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    ang = np.arange(n, dtype=np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)


def emb_h(dim: int) -> torch.Tensor:
    """The reference's frozen time half: token r*W + t holds sincos(t). (R*W, dim)"""
    return torch.from_numpy(np.tile(sincos(dim, W), (R, 1))).float()


def _lin(g: torch.Generator, out: int, inp: int, scale: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(out, inp, generator=g) * scale, torch.randn(out, generator=g) * scale


def _blocks(g: torch.Generator, prefix: str, dim: int, depth: int) -> dict[str, torch.Tensor]:
    sd = {}
    shapes = {
        "norm1": None,
        "attn.qkv": (3 * dim, dim),
        "attn.proj": (dim, dim),
        "norm2": None,
        "mlp.fc1": (4 * dim, dim),
        "mlp.fc2": (dim, 4 * dim),
    }
    for i in range(depth):
        for name, shape in shapes.items():
            if shape is None:  # LayerNorm: weight near 1
                w, b = 1 + 0.1 * torch.randn(dim, generator=g), 0.1 * torch.randn(dim, generator=g)
            else:
                w, b = _lin(g, *shape)
            sd[f"{prefix}{i}.{name}.weight"], sd[f"{prefix}{i}.{name}.bias"] = w, b
    return sd


def ref_encoder_sd(seed: int, D: int = 64, depth: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "patch_embed.proj.weight": torch.randn(D, 1, 1, P, generator=g) * 0.2,  # Conv2d, kernel (1, p)
        "patch_embed.proj.bias": torch.randn(D, generator=g) * 0.1,
        "pos_embed_proj.emb_h": emb_h(D // 2),
    }
    w, b = _lin(g, D // 2, K)
    sd["pos_embed_proj.predictor_pos_embed_proj.weight"], sd["pos_embed_proj.predictor_pos_embed_proj.bias"] = w, b
    sd |= _blocks(g, "blocks.", D, depth)
    sd["norm.weight"], sd["norm.bias"] = 1 + 0.1 * torch.randn(D, generator=g), 0.1 * torch.randn(D, generator=g)
    return sd


def ref_predictor_sd(seed: int, D: int = 64, Dp: int = 32, depth: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    sd["predictor_embed.weight"], sd["predictor_embed.bias"] = _lin(g, Dp, D)
    sd["mask_token"] = torch.randn(1, 1, Dp, generator=g) * 0.1
    sd["predictor_2dpe_proj.emb_h"] = emb_h(Dp // 2)
    w, b = _lin(g, Dp // 2, K)
    sd["predictor_2dpe_proj.predictor_pos_embed_proj.weight"] = w
    sd["predictor_2dpe_proj.predictor_pos_embed_proj.bias"] = b
    sd |= _blocks(g, "predictor_blocks.", Dp, depth)
    sd["predictor_norm.weight"], sd["predictor_norm.bias"] = 1 + 0.1 * torch.randn(Dp, generator=g), torch.zeros(Dp)
    sd["predictor_proj.weight"], sd["predictor_proj.bias"] = _lin(g, D, Dp)
    return sd


def ref_checkpoint(D: int = 64, depth: int = 2, Dp: int = 32, pdepth: int = 2) -> dict:
    """What the reference's save_checkpoint writes; its target encoder DDP-wrapped (`module.` keys)."""
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param])
    param.grad = torch.ones(3)
    opt.step()
    target = {f"module.{k}": v for k, v in ref_encoder_sd(2, D, depth).items()}
    return {
        "encoder": ref_encoder_sd(1, D, depth),
        "predictor": ref_predictor_sd(3, D, Dp, pdepth),
        "target_encoder": target,
        "opt": opt.state_dict(),
        "scaler": None,
        "epoch": 300,
        "loss": 0.125,
        "batch_size": 16,
        "world_size": 4,
        "lr": 1e-3,
    }


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    grads = np.random.default_rng(0).standard_normal((R, K))
    np.savetxt(tmp_path / "gradient_mapping.csv", grads, delimiter=",")  # headerless, as the reference's
    torch.save(ref_checkpoint(), tmp_path / "jepa-latest.pth.tar")
    return {
        "ckpt": tmp_path / "jepa-latest.pth.tar",
        "grads": tmp_path / "gradient_mapping.csv",
        "out": tmp_path / "imported.pt",
    }


# ------------------------------------------------------------------ the reference forward, written out
def ref_positions(sd: dict, prefix: str, grads: torch.Tensor) -> torch.Tensor:
    g = F.linear(grads, sd[f"{prefix}predictor_pos_embed_proj.weight"], sd[f"{prefix}predictor_pos_embed_proj.bias"])
    g = g.repeat_interleave(W, dim=0)  # (R*W, D/2): ROI-major
    g = (g - g.min()) / (g.max() - g.min()) * 2 - 1
    return torch.cat([sd[f"{prefix}emb_h"], g], dim=1)  # (R*W, D): time half first


def ref_block(x: torch.Tensor, sd: dict, pre: str, heads: int) -> torch.Tensor:
    B, N, C = x.shape
    ln = lambda y, n: F.layer_norm(y, (C,), sd[f"{pre}{n}.weight"], sd[f"{pre}{n}.bias"], eps=1e-6)  # noqa: E731
    lin = lambda y, n: y @ sd[f"{pre}{n}.weight"].T + sd[f"{pre}{n}.bias"]  # noqa: E731
    q, k, v = lin(ln(x, "norm1"), "attn.qkv").reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)  # (B, H, N, N)
    x = x + lin((attn @ v).transpose(1, 2).reshape(B, N, C), "attn.proj")
    return x + lin(F.gelu(lin(ln(x, "norm2"), "mlp.fc1")), "mlp.fc2")


def ref_encoder(sd: dict, grads: torch.Tensor, x: torch.Tensor, heads: int, depth: int = 2) -> torch.Tensor:
    t = F.conv2d(x[:, None], sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=(1, P))
    t = t.flatten(2).transpose(1, 2) + ref_positions(sd, "pos_embed_proj.", grads)  # (B, R*W, D)
    for i in range(depth):
        t = ref_block(t, sd, f"blocks.{i}.", heads)
    return F.layer_norm(t, (t.shape[-1],), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


def ref_predictor(
    sd: dict,
    grads: torch.Tensor,
    ctx: torch.Tensor,
    ctx_idx: torch.Tensor,
    tgt_idx: torch.Tensor,
    heads: int,
    depth: int = 2,
) -> torch.Tensor:
    pe = ref_positions(sd, "predictor_2dpe_proj.", grads)  # (N, Dp)
    x = ctx @ sd["predictor_embed.weight"].T + sd["predictor_embed.bias"] + pe[ctx_idx]  # (B, Nc, Dp)
    x = torch.cat([x, sd["mask_token"] + pe[tgt_idx]], dim=1)
    for i in range(depth):
        x = ref_block(x, sd, f"predictor_blocks.{i}.", heads)
    x = F.layer_norm(x, (x.shape[-1],), sd["predictor_norm.weight"], sd["predictor_norm.bias"], eps=1e-6)
    return x[:, ctx.shape[1] :] @ sd["predictor_proj.weight"].T + sd["predictor_proj.bias"]


def load_ours(path: Path) -> tuple[JEPAModels, dict]:
    """Our own loading code: checkpoint -> ModelConfig -> JEPAModels.load_state_dict (strict)."""
    ckpt = load_checkpoint(path)
    cfg = from_mapping(ModelConfig, ckpt["model_config"], "model_config")
    models = JEPAModels(cfg, torch.from_numpy(np.asarray(ckpt["gradients"])))
    models.load_state_dict(ckpt["models"])
    return models.eval(), ckpt


# ------------------------------------------------------------------ tests
def test_imported_model_computes_the_reference_formulas(files: dict[str, Path]) -> None:
    r = import_reference(files["ckpt"], files["grads"], files["out"], num_heads=4)
    assert (r.epoch, r.sincos_max_diff, r.scaling) == (300, 0.0, "none")  # emb_h is exactly our table
    models, ckpt = load_ours(files["out"])
    cfg = models.cfg
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.pred_dim, cfg.pred_depth, cfg.pred_heads) == (
        64,
        2,
        4,
        32,
        2,
        4,
    )
    assert (cfg.n_rois, cfg.n_frames, cfg.patch_size, cfg.gradient_components, cfg.mlp_ratio) == (R, T, P, K, 4.0)
    assert (ckpt["kind"], ckpt["step"], ckpt["trainer"], ckpt["reference"]["epoch"]) == ("pretrain", 0, None, 300)
    ref = torch.load(files["ckpt"], weights_only=True)
    grads = torch.from_numpy(np.loadtxt(files["grads"], delimiter=",")).float()
    x = torch.randn(3, R, T, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(models.encoder(x), ref_encoder(ref["encoder"], grads, x, 4), atol=1e-5)
        target = {k.removeprefix("module."): v for k, v in ref["target_encoder"].items()}
        assert torch.allclose(models.target(x), ref_encoder(target, grads, x, 4), atol=1e-5)
        ctx_idx = torch.stack([torch.randperm(R * W)[:15] for _ in range(3)])  # (B, Nc)
        tgt_idx = torch.stack([torch.randperm(R * W)[:9] for _ in range(3)])  # (B, Nt)
        ctx = torch.randn(3, 15, 64)
        ours = models.predictor(ctx, ctx_idx, tgt_idx)
        assert torch.allclose(ours, ref_predictor(ref["predictor"], grads, ctx, ctx_idx, tgt_idx, 4), atol=1e-5)
        # the head count is not in the shapes, but it changes the function (why --size / --num-heads)
        assert not torch.allclose(ours, ref_predictor(ref["predictor"], grads, ctx, ctx_idx, tgt_idx, 2), atol=1e-3)


@pytest.mark.parametrize(
    "part,edit,match",
    [
        (
            "encoder",
            lambda sd: sd.update({"blocks.0.attn.q_norm.weight": torch.ones(16)}),
            "blocks.0.attn.q_norm.weight",
        ),
        ("predictor", lambda sd: sd.pop("predictor_norm.weight"), "predictor.norm.weight"),
        ("target_encoder", lambda sd: sd.update({"module.norm.bias": torch.zeros(65)}), r"norm.bias.*\(65,\).*\(64,\)"),
        ("encoder", lambda sd: sd.pop("pos_embed_proj.emb_h"), "pos_embed_proj.emb_h"),
        (
            "predictor",
            lambda sd: sd.update({"predictor_2dpe_proj.emb_h": emb_h(16).roll(1, 0)}),
            r"predictor_2dpe_proj.emb_h.*differs from our sin-cos",
        ),
    ],
)
def test_a_key_that_does_not_fit_is_named(files: dict[str, Path], part: str, edit, match: str) -> None:
    ckpt = ref_checkpoint()
    edit(ckpt[part])
    torch.save(ckpt, files["ckpt"])
    with pytest.raises(DataError, match=match):
        import_reference(files["ckpt"], files["grads"], files["out"], num_heads=4)
    assert not files["out"].exists()


@pytest.mark.parametrize("size,D,heads", [("S", 384, 6), ("L", 1024, 16)])
def test_reference_sizes_set_the_head_count(files: dict[str, Path], size: str, D: int, heads: int) -> None:
    torch.save(ref_checkpoint(D=D, depth=1, Dp=384, pdepth=1), files["ckpt"])
    r = import_reference(files["ckpt"], files["grads"], files["out"], size=size)
    cfg = load_ours(files["out"])[0].cfg
    assert r.model == cfg and (cfg.size, cfg.num_heads, cfg.pred_heads) == (
        ModelConfig(size=cfg.size).size,
        heads,
        heads,
    )
    assert (cfg.embed_dim, cfg.depth, cfg.pred_dim, cfg.pred_depth) == (D, 1, 384, 1)
    wrong = "B"
    with pytest.raises(DataError, match=f"--size {wrong}.*768 wide.*{D} wide"):
        import_reference(files["ckpt"], files["grads"], files["out"], size=wrong)


def test_head_count_must_be_given_and_window_options_are_checked(files: dict[str, Path]) -> None:
    with pytest.raises(DataError, match="--size S|B|L.*--num-heads"):
        import_reference(files["ckpt"], files["grads"], files["out"])
    with pytest.raises(DataError, match="--n-frames 160.*32 frames"):
        import_reference(files["ckpt"], files["grads"], files["out"], num_heads=4, n_frames=160)
    with pytest.raises(DataError, match=r"--patch-size 8.*kernel \(1, 16\)"):
        import_reference(files["ckpt"], files["grads"], files["out"], num_heads=4, patch_size=8)


def test_normalization_npz_becomes_our_robust_scaling(files: dict[str, Path], tmp_path: Path) -> None:
    med, iqr = np.linspace(-1, 1, R), np.linspace(0.5, 2, R)
    np.savez(tmp_path / "normalization_params_train.npz", medians=med, iqrs=iqr)
    r = import_reference(
        files["ckpt"],
        files["grads"],
        files["out"],
        num_heads=4,
        normalization=tmp_path / "normalization_params_train.npz",
    )
    s = RobustScaling.from_dict(load_checkpoint(files["out"])["scaling"])
    assert r.scaling == "scaling" and np.array_equal(s.median, med) and np.array_equal(s.iqr, iqr)
    np.savez(tmp_path / "other.npz", mean=med, std=iqr)  # not medians / iqrs: kept aside, said so
    assert (
        import_reference(
            files["ckpt"], files["grads"], files["out"], num_heads=4, normalization=tmp_path / "other.npz"
        ).scaling
        == "reference_normalization"
    )
    ckpt = load_checkpoint(files["out"])
    assert ckpt["scaling"] is None and ckpt["reference_normalization"]["mean"] == med.tolist()
    np.savez(tmp_path / "bad.npz", medians=med[:5], iqrs=iqr[:5])
    with pytest.raises(DataError, match=r"medians \(5,\).*\(20,\)"):
        import_reference(files["ckpt"], files["grads"], files["out"], num_heads=4, normalization=tmp_path / "bad.npz")


@dataclass
class Pickled:  # an arbitrary object: torch.load(weights_only=True) refuses it
    x: int = 1


def test_arbitrary_objects_are_not_unpickled(files: dict[str, Path]) -> None:
    torch.save(ref_checkpoint() | {"args": Pickled()}, files["ckpt"])
    with pytest.raises(DataError, match="refuse to unpickle"):
        import_reference(files["ckpt"], files["grads"], files["out"], num_heads=4)


def test_cli_end_to_end(files: dict[str, Path]) -> None:
    runner = CliRunner()
    args = ["import-reference", str(files["ckpt"]), "--gradients", str(files["grads"]), "--out", str(files["out"])]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--num-heads" in r.output and not files["out"].exists()
    r = runner.invoke(app, [*args, "--num-heads", "4"])
    assert r.exit_code == 0, r.output
    assert f"wrote {files['out']}" in r.output and "(4 heads)" in r.output
    assert load_ours(files["out"])[0].cfg.num_heads == 4
