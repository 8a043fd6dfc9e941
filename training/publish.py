"""Publishing checkpoints as HF-format folders that serving workers hot-reload (the writer side of
crescent.models.published, which defines the layout and validates it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from crescent.models.config import ModelConfig
from crescent.models.published import sha256_file, version_name
from crescent.training.tokenizer import IM_END, save_tokenizer, special_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "uncommitted"


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each storage once (a tied head aliases the embedding) in float32, contiguous."""
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    return out


def publish_checkpoint(model: torch.nn.Module, config: ModelConfig, tokenizer: Tokenizer, model_dir: Path,
                       name: str, step: int, metrics: dict[str, Any]) -> Path:
    """Write ``<model_dir>/<name>/v<step>`` atomically and return its path."""
    root = Path(model_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    final = root / version_name(step)
    if final.exists():
        raise FileExistsError(f"{final} is already published; versions are immutable (use a later step)")
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
        save_file(_weights(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_tokenizer(tokenizer, tmp, max_length=config.max_position_embeddings)
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": special_id(tokenizer, IM_END)}))
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        manifest = {"name": name, "step": step, "metrics": metrics, "commit": git_commit(),
                    "created_at": datetime.now(timezone.utc).isoformat(), "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        for p in tmp.iterdir():
            with p.open("rb") as f:
                os.fsync(f.fileno())
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
