"""``crescent train {pretrain,rl,demo}``: flags map onto the typed settings (env CRESCENT_* works too)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pydantic import Field, ValidationError

from crescent.settings import CrescentSettings, add_settings_flags, settings_from_flags
from crescent.training.settings import PretrainSettings, RLSettings


class DemoSettings(CrescentSettings):
    """Pretrain a small MoBA model, RL-tune it on arithmetic, publish both (sized for <= 20 min on 2 CPU cores).

    Measured end to end (`make train-demo` on the 2-core dev machine, a `crescent up` on the published directory
    running beside it): 594 s in all; the corpus and tokenizer ~1 min, 700 pretraining steps (4M params, 2048
    tokens/step, ~2,800 tokens/s) ~8 min, 10 RL iterations and publishing ~1 min; the running cluster served the
    RL version within 4 s of its publication. Ten iterations are a smoke run, not the RL benchmark's recipe.
    """

    out_dir: Path = Field(Path("runs/demo"), description="Run folder (pretrain/ and rl/ inside).")
    model_dir: Path = Field(Path("runs/demo/models"), description="Where versions are published.")
    model_name: str = Field("crescent-tiny", description="Published model name.")
    pretrain_steps: int = Field(700, description="Pretraining steps.")
    rl_iterations: int = Field(10, description="k1.5 iterations (16 prompts x 8 samples each).")
    device: str = Field("cpu", description="torch device.")
    seed: int = Field(0, description="Seed of everything.")


def _publisher(model_dir: Path | None, name: str, tokenizer_file: Path):
    """A checkpoint hook that publishes ``<model_dir>/<name>/v<step>`` (None when no model_dir is set)."""
    if model_dir is None:
        return None
    from tokenizers import Tokenizer

    from crescent.training.publish import publish_checkpoint

    def hook(model, config, step, metrics):
        tok = Tokenizer.from_file(str(tokenizer_file))
        path = publish_checkpoint(model, config, tok, model_dir, name, step, metrics)
        print(f"published {path}", file=sys.stderr)

    return hook


def cmd_pretrain(s: PretrainSettings) -> dict:
    from crescent.training.pretrain import pretrain

    result = pretrain(s, _publisher(s.model_dir, s.model_name, s.out_dir / "tokenizer" / "tokenizer.json"))
    return {"step": result.step, "checkpoint": str(result.checkpoint), "history": result.history}


def cmd_rl(s: RLSettings) -> dict:
    from crescent.training.rl import run_rl

    result = run_rl(s, _publisher(s.model_dir, s.model_name, s.init_from / "tokenizer" / "tokenizer.json"))
    return {"before": result.before, "after": result.after, "iterations": len(result.history)}


def cmd_demo(d: DemoSettings) -> dict:
    t0 = time.perf_counter()
    pre = PretrainSettings(out_dir=d.out_dir / "pretrain", model_dir=d.model_dir, model_name=d.model_name,
                           steps=d.pretrain_steps, checkpoint_every=d.pretrain_steps, eval_every=100,
                           device=d.device, seed=d.seed)
    pre_out = cmd_pretrain(pre)
    rl = RLSettings(init_from=pre.out_dir, out_dir=d.out_dir / "rl", model_dir=d.model_dir,
                    model_name=d.model_name, iterations=d.rl_iterations, prompts_per_iteration=16,
                    eval_prompts=100, device=d.device, seed=d.seed)
    rl_out = cmd_rl(rl)
    return {"pretrain": pre_out, "rl": rl_out, "seconds": time.perf_counter() - t0,
            "published": str(d.model_dir / d.model_name)}


_COMMANDS = {"pretrain": (PretrainSettings, cmd_pretrain), "rl": (RLSettings, cmd_rl), "demo": (DemoSettings, cmd_demo)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crescent train", description="Train, RL-tune and publish models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _) in _COMMANDS.items():
        add_settings_flags(sub.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0]), cls)
    return parser


def train_cli(argv: list[str] | None = None) -> int:
    """Entry point of ``crescent train``; prints a JSON summary, returns the exit code."""
    ns = build_parser().parse_args(argv)
    cls, run = _COMMANDS[ns.command]
    try:
        settings = settings_from_flags(cls, ns)
    except (ValidationError, ValueError) as e:
        print(f"crescent train {ns.command}: invalid settings: {e}", file=sys.stderr)
        return 2
    try:
        summary = run(settings)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"crescent train {ns.command}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(train_cli())
