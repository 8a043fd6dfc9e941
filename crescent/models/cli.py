"""``crescent model ...``: prepare the default model, make tiny test models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crescent.models.prepare import ensure_default_model, make_tiny_model
from crescent.models.registry import ModelLoadError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crescent model", description="Prepare and create model folders.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="convert the bundled SmolLM2 GGUF into the model cache (once)")
    prep.add_argument("--cache-dir", type=Path, default=None, help="model cache (default ~/.cache/crescent/models)")
    tiny = sub.add_parser("tiny", help="write a small random Llama folder with the SmolLM2 tokenizer")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.add_argument("--heads", type=int, default=4)
    tiny.add_argument("--kv-heads", type=int, default=2)
    tiny.add_argument("--attention", choices=["full", "moba"], default="full")
    tiny.add_argument("--moba-block-size", type=int, default=16)
    tiny.add_argument("--moba-topk", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--tokenizer-from", type=Path, default=None,
                      help="model folder to copy the tokenizer from (default: the prepared default model)")
    return parser


def model_cli(argv: list[str]) -> int:
    """Run a ``model`` subcommand; prints the resulting folder. Returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            path = ensure_default_model(args.cache_dir)
        else:
            path = make_tiny_model(args.out_dir, layers=args.layers, hidden=args.hidden, heads=args.heads,
                                   kv_heads=args.kv_heads, attention=args.attention,
                                   moba_block_size=args.moba_block_size, moba_topk=args.moba_topk, seed=args.seed,
                                   tokenizer_from=args.tokenizer_from)
    except (ModelLoadError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(model_cli(sys.argv[1:]))
