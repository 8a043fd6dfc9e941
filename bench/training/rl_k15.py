"""Kimi k1.5 RL on arithmetic: held-out accuracy before/after, and response length with/without the length penalty.

Pretrains one small model (or reuses ``--init-from``), then runs two RL jobs from it in parallel processes: one with
the k1.5 length penalty (after its warm-up), one without. Both evaluate greedily on the same held-out problems.
Goals: accuracy +20 points after RL; shorter responses with the penalty than without.

    python -m bench.training.rl_k15 --device cuda --pretrain-steps 1500 --iterations 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.results_io import write_result
from crescent.training.pretrain import pretrain
from crescent.training.settings import PretrainSettings, RLSettings


def rl_job(init_from: Path, out_dir: Path, args: argparse.Namespace, length_weight: float) -> dict:
    flags = {"init_from": init_from, "out_dir": out_dir, "iterations": args.iterations, "device": args.device,
             "length_penalty_weight": length_weight, "length_penalty_warmup": args.length_warmup,
             "prompts_per_iteration": args.prompts, "samples_per_prompt": args.k, "seed": args.seed,
             "eval_prompts": args.eval_prompts, "max_new_tokens": args.max_new_tokens, "lr": args.lr,
             "eval_difficulty": args.eval_difficulty, "max_difficulty": args.max_difficulty,
             "temperature": args.temperature, "updates_per_iteration": args.updates,
             "min_difficulty": args.min_difficulty, "optimizer": args.optimizer, "embedding_lr": args.embedding_lr}
    cmd = [sys.executable, "-m", "crescent.training.cli", "rl", "--no-progress"]
    for key, value in flags.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    # The two jobs run side by side: half the cores each, not two oversubscribed thread pools.
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"rl (length weight {length_weight}) failed:\n{proc.stderr[-3000:]}")
    return json.loads((out_dir / "metrics.json").read_text())


def plot(with_lp: dict, without_lp: dict, warmup: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, m, color in (("length penalty", with_lp, "tab:blue"), ("no length penalty", without_lp, "tab:gray")):
        its = [h["iteration"] for h in m["history"]]
        ax1.plot(its, [h["pass_rate"] for h in m["history"]], color=color, label=label)
        ax2.plot(its, [h["mean_length"] for h in m["history"]], color=color, label=label)
    for ax in (ax1, ax2):
        ax.axvline(warmup, color="k", lw=0.6, ls=":")
        ax.set_xlabel("RL iteration")
        ax.legend(fontsize=8)
    ax1.set_ylabel("training pass rate (sampled)")
    ax2.set_ylabel("mean response length (tokens)")
    fig.suptitle(f"k1.5 RL: held-out greedy accuracy {with_lp['before']['accuracy']:.2f} -> "
                 f"{with_lp['after']['accuracy']:.2f} (LP) / {without_lp['after']['accuracy']:.2f} (no LP)")
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--init-from", type=Path, default=None, help="pretraining run folder (skip pretraining)")
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--pretrain-batch", type=int, default=16)
    p.add_argument("--pretrain-settings", type=json.loads, default={},
                   help='extra PretrainSettings fields as JSON, e.g. \'{"hidden_size": 128, "num_layers": 2}\'')
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--length-warmup", type=int, default=5)
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--eval-difficulty", type=int, default=2, help="digits per operand of the held-out problems")
    p.add_argument("--min-difficulty", type=int, default=1, help="curriculum's first difficulty")
    p.add_argument("--max-difficulty", type=int, default=3, help="curriculum's last difficulty")
    rl = RLSettings()  # the RL defaults the sidecar itself would use
    p.add_argument("--optimizer", choices=["muon", "adamw"], default=rl.optimizer)
    p.add_argument("--lr", type=float, default=rl.lr, help="RL learning rate (Muon's with muon)")
    p.add_argument("--embedding-lr", type=float, default=rl.embedding_lr,
                   help="AdamW lr of embeddings/head/norms with --optimizer muon")
    p.add_argument("--temperature", type=float, default=rl.temperature, help="rollout temperature")
    p.add_argument("--updates", type=int, default=2, help="gradient steps per RL iteration")
    p.add_argument("--work-dir", type=Path, default=None, help="keep runs here instead of a temp folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-timeout", type=int, default=3000)
    p.add_argument("--name", default="training_rl_k15")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = args.work_dir or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        init = args.init_from
        pre = None
        if init is None:
            init = base / "pretrain"
            pre = pretrain(PretrainSettings(out_dir=init, steps=args.pretrain_steps, device=args.device,
                                            batch_size=args.pretrain_batch, eval_every=100,
                                            **args.pretrain_settings,
                                            checkpoint_every=args.pretrain_steps, seed=args.seed, progress=False))
        with ThreadPoolExecutor(2) as pool:
            lp, no_lp = pool.map(lambda w: rl_job(init, base / f"rl_{w:g}", args, w), [0.5, 0.0])
    results = {
        "accuracy_before": lp["before"]["accuracy"],
        "accuracy_after_with_length_penalty": lp["after"]["accuracy"],
        "accuracy_after_without_length_penalty": no_lp["after"]["accuracy"],
        "accuracy_gain_points": 100 * (lp["after"]["accuracy"] - lp["before"]["accuracy"]),
        "mean_length_before": lp["before"]["mean_length"],
        "mean_length_after_with_length_penalty": lp["after"]["mean_length"],
        "mean_length_after_without_length_penalty": no_lp["after"]["mean_length"],
        "goal": "accuracy_gain_points >= 20",
        "goal_met": 100 * (lp["after"]["accuracy"] - lp["before"]["accuracy"]) >= 20,
        "pretrain_final": pre.history[-1] if pre else None,
        "history_with_length_penalty": lp["history"], "history_without_length_penalty": no_lp["history"],
    }
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path = write_result(args.name, config, results, plot(lp, no_lp, args.length_warmup))
    print(json.dumps({k: v for k, v in results.items() if not k.startswith("history")}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
