"""The published-model format: one place that says what a published model directory is (training writes it,
serving reads it).

Layout of a model directory (``<model_dir>/<name>/``)::

    v000200/                 one published version per checkpoint, named v<step, 6+ digits>
        config.json          ModelConfig.to_hf() (crescent_attention says which layers are MoBA)
        model.safetensors    weights (float32; a tied output head is stored once, as the embedding)
        tokenizer.json       byte-level BPE
        tokenizer_config.json  special tokens + chat_template
        generation_config.json eos token
        manifest.json        name, step, metrics, commit, created_at, sha256 + size of every file above
    .v000400.tmp-<pid>/      a version being written (ignored by readers)

The writer (crescent.training.publish) writes a version completely into a dot-named temp folder, fsyncs it and
renames it into place, so a reader sees either no ``v000400`` or a complete one. Readers list versions with
:func:`published_versions` and gate a load on :func:`validate_checkpoint`. Torch-free: the gateway reads it too.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from safetensors import safe_open
from tokenizers import Tokenizer

from crescent.models.config import ModelConfig

_VERSION = re.compile(r"^v(\d+)$")
VERSION_SEP = "@"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "manifest.json")


class CheckpointError(ValueError):
    """A published checkpoint folder is missing, incomplete or corrupt; the message says what and where."""


def version_name(step: int) -> str:
    return f"v{step:06d}"


def version_number(version: str) -> int:
    m = _VERSION.match(version)
    if m is None:
        raise ValueError(f"{version!r} is not a version folder name (v<digits>)")
    return int(m.group(1))


def published_versions(root: Path) -> list[Path]:
    """Version folders of a published model directory, oldest first (temp ``.v*.tmp-*`` folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _VERSION.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_version(model_dir: Path) -> Path | None:
    """The newest published version folder of one model (``<model_dir>/<name>``), or None when there is none."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return None
    versions = [(int(m.group(1)), p) for p in model_dir.iterdir() if p.is_dir() and (m := _VERSION.match(p.name))]
    return max(versions)[1] if versions else None


def is_published_dir(path: str | Path) -> bool:
    """True for ``<model_dir>/<name>/`` holding v* versions (and not itself an HF model folder)."""
    path = Path(path).expanduser()
    return path.is_dir() and not (path / "config.json").is_file() and bool(published_versions(path))


def versioned_model_id(name: str, version: str) -> str:
    """The block-hash namespace of one version: ``tiny@v000200``."""
    return f"{name}{VERSION_SEP}{version}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        if not fpath.is_file() or fpath.stat().st_size != entry.get("bytes") or sha256_file(fpath) != entry.get("sha256"):
            raise CheckpointError(f"{fpath} does not match its sha256/size in manifest.json (corrupt or edited)")
    try:
        config = ModelConfig.from_hf(_read_json(path / "config.json"))
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    try:
        with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
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


def newest_valid_version(root: Path) -> Path:
    """The newest version of a published model directory that passes :func:`validate_checkpoint`."""
    refused = []
    for path in reversed(published_versions(root)):
        try:
            validate_checkpoint(path)
        except (CheckpointError, OSError) as e:
            refused.append(f"{path.name}: {e}")
            continue
        return path
    raise CheckpointError(f"{root} holds no valid published version ({'; '.join(refused) or 'no v* folders'})")
