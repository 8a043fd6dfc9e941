"""Muon (Moonlight) vs AdamW: same model, data and token budget, each at its best lr from a sweep.

Every run is ``crescent train pretrain`` in its own process (run in parallel, ``--parallel``) over one shared
tokenizer + token cache. Reports each optimizer's best lr (lowest final val loss), and how many steps best-Muon
needs to reach best-AdamW's final val loss (linear interpolation between evaluations). Goal: <= 0.7x.

    python -m bench.training.muon_vs_adamw --device cuda --steps 1000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.results_io import write_result
from crescent.training.pretrain import prepare_data
from crescent.training.settings import PretrainSettings

SHAPES = {  # ~11M parameters (tied 4096-token embedding); "tiny" is for smoke runs only
    "11m": dict(hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6, num_kv_heads=2),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1),
}


def run_one(base: Path, shape: dict, args: argparse.Namespace, optimizer: str, lr: float) -> dict:
    run_dir = base / f"{optimizer}_{lr:g}"
    run_dir.mkdir()
    for name in ("tokenizer", "tokens.pt"):
        src = base / "data" / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, run_dir / name)
    flags = {"out_dir": run_dir, "optimizer": optimizer, "lr": lr, "steps": args.steps, "device": args.device,
             "batch_size": args.batch_size, "seq_len": args.seq_len, "eval_every": max(1, args.steps // 20),
             "checkpoint_every": args.steps, "warmup_steps": max(1, args.steps // 20), "seed": args.seed, **shape}
    cmd = [sys.executable, "-m", "crescent.training.cli", "pretrain", "--no-progress"]
    for key, value in flags.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{optimizer} lr={lr} failed:\n{proc.stderr[-3000:]}")
    history = json.loads(proc.stdout)["history"]
    return {"optimizer": optimizer, "lr": lr, "history": history, "final_val_loss": history[-1]["val_loss"]}


def steps_to_reach(history: list[dict], target: float) -> float | None:
    """First step at which val loss reaches ``target``, interpolated between evaluations; None if never."""
    prev_step, prev_loss = 0, float("inf")
    for h in history:
        if h["val_loss"] <= target:
            if prev_loss == float("inf"):
                return float(h["step"])
            frac = (prev_loss - target) / (prev_loss - h["val_loss"])
            return prev_step + frac * (h["step"] - prev_step)
        prev_step, prev_loss = h["step"], h["val_loss"]
    return None


def plot(runs: list[dict], best: dict[str, dict], target: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"muon": "tab:blue", "adamw": "tab:orange"}
    for r in runs:
        steps, losses = [h["step"] for h in r["history"]], [h["val_loss"] for h in r["history"]]
        is_best = r is best[r["optimizer"]]
        ax.plot(steps, losses, color=colors[r["optimizer"]], alpha=1.0 if is_best else 0.3,
                lw=2 if is_best else 1, ls="-" if is_best else "--", label=f"{r['optimizer']} lr={r['lr']:g}")
    ax.axhline(target, color="gray", lw=0.8, ls=":", label="AdamW final val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("Muon (Moonlight) vs AdamW, same model and tokens")
    ax.legend(fontsize=7)
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--shape", choices=sorted(SHAPES), default="11m")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="comma-separated lr sweep (both optimizers)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-timeout", type=int, default=3000, help="seconds per run")
    p.add_argument("--name", default="training_muon_vs_adamw")
    args = p.parse_args(argv)
    lrs = [float(x) for x in args.lrs.split(",")]
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        prepare_data(PretrainSettings(out_dir=base / "data", seed=args.seed, seq_len=args.seq_len, **shape))
        jobs = [(opt, lr) for opt in ("muon", "adamw") for lr in lrs]
        with ThreadPoolExecutor(args.parallel) as pool:
            runs = list(pool.map(lambda job: run_one(base, shape, args, *job), jobs))
    best = {opt: min((r for r in runs if r["optimizer"] == opt), key=lambda r: r["final_val_loss"])
            for opt in ("muon", "adamw")}
    target = best["adamw"]["final_val_loss"]
    muon_steps = steps_to_reach(best["muon"]["history"], target)
    ratio = None if muon_steps is None else muon_steps / args.steps
    results = {"runs": runs, "best_lr": {k: v["lr"] for k, v in best.items()},
               "final_val_loss": {k: v["final_val_loss"] for k, v in best.items()},
               "adamw_steps": args.steps, "muon_steps_to_adamw_final": muon_steps,
               "step_ratio": ratio, "goal": "step_ratio <= 0.7", "goal_met": ratio is not None and ratio <= 0.7}
    config = {**vars(args), "model": shape, "tokens_per_step": args.batch_size * args.seq_len}
    path = write_result(args.name, config, results, plot(runs, best, target))
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
