"""Publishing checkpoints as HF-format folders that serving workers hot-reload.

Layout of a model directory (``<model_dir>/<name>/``)::

    v000200/                 one published version per checkpoint, named v<step, 6+ digits>
        config.json          ModelConfig.to_hf() (crescent_attention says which layers are MoBA)
        model.safetensors    weights (float32; a tied output head is stored once, as the embedding)
        tokenizer.json       byte-level BPE
        tokenizer_config.json  special tokens + chat_template
        generation_config.json eos token
        manifest.json        name, step, metrics, commit, created_at, sha256 + size of every file above
    .v000400.tmp-<pid>/      a version being written (ignored by readers)

A version is written completely into a dot-named temp folder, fsynced, then renamed into place: ``rename`` is
atomic on one filesystem, so a reader sees either no ``v000400`` or a complete one. Workers poll
:func:`latest_version` and gate a reload on :func:`validate_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from crescent.models.config import ModelConfig
from crescent.training.tokenizer import IM_END, save_tokenizer, special_id

_VERSION = re.compile(r"^v(\d+)$")
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "manifest.json")


class CheckpointError(ValueError):
    """A published checkpoint folder is missing, incomplete or corrupt; the message says what and where."""


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return "uncommitted"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "uncommitted"


def version_name(step: int) -> str:
    return f"v{step:06d}"


def latest_version(model_dir: Path) -> Path | None:
    """The newest published version folder of one model (``<model_dir>/<name>``), or None when there is none."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return None
    versions = [(int(m.group(1)), p) for p in model_dir.iterdir() if p.is_dir() and (m := _VERSION.match(p.name))]
    return max(versions)[1] if versions else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def validate_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete, uncorrupted published version."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} is incomplete: missing {missing}")
    manifest = _read_json(path / "manifest.json")
    for fname, entry in manifest.get("files", {}).items():
        fpath = path / fname
        if not fpath.is_file() or fpath.stat().st_size != entry.get("bytes") or _sha256(fpath) != entry.get("sha256"):
            raise CheckpointError(f"{fpath} does not match its sha256/size in manifest.json (corrupt or edited)")
    try:
        config = ModelConfig.from_hf(_read_json(path / "config.json"))
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            names = list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path / 'model.safetensors'} cannot be read: {e}") from e
    if not any("embed" in n for n in names):
        raise CheckpointError(f"{path / 'model.safetensors'} holds no embedding tensor (found {names[:5]}...)")
    try:
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on parse errors
        raise CheckpointError(f"{path / 'tokenizer.json'} cannot be loaded: {e}") from e
    if tok.get_vocab_size() > config.vocab_size:
        raise CheckpointError(f"tokenizer has {tok.get_vocab_size()} tokens but config.json vocab_size is "
                              f"{config.vocab_size}")
    if not _read_json(path / "tokenizer_config.json").get("chat_template"):
        raise CheckpointError(f"{path / 'tokenizer_config.json'} has no chat_template")
