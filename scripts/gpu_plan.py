"""The fast path's GPU measurements in one call, most important first, inside a time budget.

From the repository root, on a GPU machine with torch, pyyaml, tqdm and matplotlib (nothing else to install):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 scripts/gpu_plan.py --out OUT --budget 480

Writes to --out (8 files, all directly in it): results.jsonl (one line per run, appended as it
goes), table.md (environment, ours beside the reference's anchor in the reference GPU figures in docs/performance.md),
numerics.json / numerics.png (fast vs eager, 200 steps, bf16), two profile-*.md (time per phase and
op) and one Chrome trace. Prints table.md last.
`--device cpu --quick` runs the same plan on tiny models, to check the plan itself on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo

from brainjepa.config import MaskConfig, ModelConfig, OptimConfig, PerfConfig
from brainjepa.jepa import JEPAModels, PretrainStep
from brainjepa.perf.bench import REFERENCE_H200 as ANCHOR
from brainjepa.perf.bench import BenchResult, fast_perf, run_bench, synthetic_batches
from brainjepa.perf.numerics import compare_paths
from brainjepa.perf.profiling import profile_steps  # noqa: F401 (run_bench profiles through it)
from brainjepa.plots import plot_loss_pair
from brainjepa.prefetch import pinned

log = logging.getLogger("gpu_plan")


@dataclass(frozen=True)
class Item:
    name: str
    size: str
    batch: int
    perf: PerfConfig
    reference_masks: bool = False
    checkpointing: bool = False
    profile: bool = False


def plan(device: str) -> list[Item]:
    eager, cudnn = PerfConfig(attention="default"), PerfConfig(attention="cudnn")
    fast, graphs = fast_perf(device), fast_perf(device, cuda_graphs=True)
    return [
        Item("B16 eager", "base", 16, eager),
        Item("B16 fast", "base", 16, fast, profile=True),
        Item("B64 eager", "base", 64, eager),
        Item("B64 fast", "base", 64, fast, profile=True),
        Item("B16 eager cudnn", "base", 16, cudnn),
        Item("B16 fast graphs", "base", 16, graphs),
        Item("B16 compile flash", "base", 16, PerfConfig(compile=True, attention="default")),
        Item("B32 eager", "base", 32, eager),
        Item("B32 fast", "base", 32, fast),
        Item("B16 fast sac", "base", 16, fast_perf(device, selective_checkpointing=True)),
        Item("B64 fast sac", "base", 64, fast_perf(device, selective_checkpointing=True)),
        # brainjepa memory's picks for <= 0.75x the reference's peak: our masks need half the blocks
        # recomputed as well; the reference's masks need selective checkpointing only
        Item("B16 fast sac+rc50", "base", 16, fast_perf(device, selective_checkpointing=True, recompute_fraction=0.5)),
        Item("B64 fast sac+rc50", "base", 64, fast_perf(device, selective_checkpointing=True, recompute_fraction=0.5)),
        Item(
            "B16 fast sac refmasks", "base", 16, fast_perf(device, selective_checkpointing=True), reference_masks=True
        ),
        Item("B16 fast refmasks", "base", 16, fast, reference_masks=True),
        Item("B64 fast refmasks", "base", 64, fast, reference_masks=True),
        Item("S16 eager", "small", 16, eager),
        Item("S16 fast", "small", 16, fast),
        Item("S64 eager", "small", 64, eager),
        Item("S64 fast", "small", 64, fast),
        Item("L16 eager", "large", 16, eager),
        Item("L16 fast", "large", 16, fast),
        Item("L32 eager", "large", 32, eager),
        Item("L32 fast", "large", 32, fast),
        Item("B64 fast graphs", "base", 64, graphs),
        Item("L32 fast ckpt", "large", 32, fast, checkpointing=True),
        Item("B64 eager refmasks", "base", 64, eager, reference_masks=True),
    ]


def table(rows: list[tuple[Item, BenchResult]]) -> str:
    lines = [
        "| run | masks | mode | samples/s | x reference | TFLOP/s | TFLOP/sample | peak GiB | x ref memory "
        "| ctx / tgt tokens | first step s |",
        "|" + "---|" * 11,
    ]
    for item, r in rows:
        ref = ANCHOR.get((r.size, r.batch))
        x = f"{r.samples_per_s / ref[0]:.2f}" if ref else "-"
        xm = f"{r.peak_memory_gib / ref[1]:.2f}" if ref else "-"
        lines.append(
            f"| {item.name} | {r.masks} | {r.mode}{' +ckpt' if item.checkpointing else ''} | "
            f"{r.samples_per_s:.1f} | {x} | {r.tflops_per_s:.0f} | {r.tflop_per_sample:.3f} | "
            f"{r.peak_memory_gib:.1f} | {xm} | {r.context_tokens:.0f} / {r.target_tokens:.0f} | "
            f"{r.first_step_s:.0f} |"
        )
    return "\n".join(lines)


def write_table(path: Path, env: dict, rows: list[tuple[Item, BenchResult]], numerics: dict) -> str:
    text = f"{json.dumps(env)}\n\n{table(rows)}\n\nnumerics: {json.dumps(numerics)}\n"
    path.write_text(text)
    return text


def matmul_ceiling(device: str) -> float:
    """bf16 TFLOP/s of an 8192^3 product on random data (the card's practical ceiling)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def host_syncs(device: str) -> list[str]:
    """Host-device synchronisations in 3 fast-path steps after warm-up (torch's sync debug mode)."""
    cfg = ModelConfig(size="tiny", n_rois=100, n_frames=160)
    step_fn = PretrainStep(
        JEPAModels(cfg, torch.randn(100, cfg.gradient_components)), OptimConfig(), 100, device, perf=fast_perf(device)
    )
    make = synthetic_batches(8, 100, 160, cfg.n_time_patches, MaskConfig())
    batches = [pinned(make(s)) for s in range(6)]
    for s in range(3):
        step_fn(batches[s], s)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        for s in range(3, 6):
            step_fn(batches[s], s)
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=480, help="seconds; items not started by then are skipped")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny models on a small grid (checks the script)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    env = {"torch": torch.__version__, "device": args.device}
    if dev.type == "cuda":
        env |= {
            "gpu": torch.cuda.get_device_name(dev),
            "capability": torch.cuda.get_device_capability(dev),
            "bf16_matmul_tflops": round(matmul_ceiling(args.device), 1),
        }
    log.info("environment %s", env)
    # blocks of every width share Block.forward's cache (train and no-grad graphs per width): room for all
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)

    if dev.type == "cuda":
        try:
            syncs = host_syncs(args.device)
            env |= {"host_syncs_in_3_fast_steps": len(syncs), "host_sync_examples": syncs[:3]}
        except RuntimeError as e:  # the fast path failing here must not cost the throughput table
            env["host_syncs_error"] = str(e)[:500]
        log.info("host syncs: %s", {k: v for k, v in env.items() if k.startswith("host_sync")})

    # 1. numerics: fast vs eager, same precision, 200 steps
    numerics: dict = {}
    try:
        n = compare_paths(
            fast_perf(args.device),
            size="tiny" if args.quick else "small",
            batch=8,
            steps=20 if args.quick else 200,
            n_rois=32 if args.quick else 100,
            n_frames=64 if args.quick else 160,
            device=args.device,
        )
        numerics = n.summary()
        plot_loss_pair(
            n.eager_loss,
            n.fast_loss,
            args.out / "numerics.png",
            ("eager", n.fast),
            f"{args.device}, {n.precision}: fast vs eager",
        )
    except RuntimeError as e:
        numerics = {"error": str(e)[:2000]}
    (args.out / "numerics.json").write_text(json.dumps(numerics, indent=2))
    log.info("numerics %s", numerics)

    # 2. throughput, in priority order
    rows: list[tuple[Item, BenchResult]] = []
    grid = dict(n_rois=100, n_frames=160) if args.quick else dict(n_rois=450, n_frames=160)
    for item in plan(args.device):
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget:
            log.info("budget spent (%.0f s): skipping %s", elapsed, item.name)
            continue
        size = "tiny" if args.quick else item.size
        batch = max(2, item.batch // 8) if args.quick else item.batch
        prof = args.out / f"profile-{item.name.replace(' ', '-')}" if item.profile else None
        try:
            r = run_bench(
                size=size,
                batch=batch,
                device=args.device,
                steps=3 if args.quick else 10,
                warmup=3,
                activation_checkpointing=item.checkpointing,
                perf=item.perf,
                reference_masks=item.reference_masks,
                profile_dir=prof,
                **grid,
            )
        except RuntimeError as e:  # out of memory, a compiler failure: one variant must not lose the others
            log.warning("%s failed: %s", item.name, str(e).splitlines()[0] if str(e) else type(e).__name__)
            with open(args.out / "results.jsonl", "a") as f:
                f.write(json.dumps({"run": item.name, "error": str(e)[:2000]}) + "\n")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            continue
        rows.append((item, r))
        with open(args.out / "results.jsonl", "a") as f:
            f.write(json.dumps({"run": item.name, "checkpointing": item.checkpointing} | r.as_dict()) + "\n")
        log.info(
            "%s: %.1f samples/s, %.0f TFLOP/s, %.1f GiB, first step %.0f s",
            item.name,
            r.samples_per_s,
            r.tflops_per_s,
            r.peak_memory_gib,
            r.first_step_s,
        )
        if prof is not None:  # flatten: every output directly in --out
            (prof / "profile.md").rename(args.out / f"{prof.name}.md")
            trace = prof / "trace.json.gz"
            if item.name == "B16 fast" and trace.stat().st_size < 15 * 2**20:
                trace.rename(args.out / "trace-B16-fast.json.gz")
            shutil.rmtree(prof)
        write_table(args.out / "table.md", env, rows, numerics)  # after every run: a timeout loses nothing
    print(write_table(args.out / "table.md", env, rows, numerics))


if __name__ == "__main__":
    main()
