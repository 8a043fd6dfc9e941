"""Which folder a model setting names: ``default``, a published model directory, or an HF-format folder.

Torch-free, so the gateway can resolve the tokenizer's folder without the engine. Converting the default model
(GGUF -> safetensors) needs torch and lives in :mod:`crescent.models.prepare`, whose ``prepare_model`` passes that
conversion in here as ``convert``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from crescent.models.published import CheckpointError, newest_valid_version
from crescent.settings import default_model_cache

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".crescent-complete"  # written last: a folder without it is a crashed conversion


class ModelLoadError(RuntimeError):
    """A model folder cannot be used; the message names the file and what is wrong with it."""


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the converted default model lives (complete when it holds :data:`COMPLETE_MARKER`)."""
    return (Path(cache_dir) if cache_dir is not None else default_model_cache()) / DEFAULT_MODEL_NAME


def resolve_model_path(name_or_path: str | Path, cache_dir: Path | None = None, *,
                       convert: Callable[[Path | None], Path] | None = None) -> Path:
    """"default" or "SmolLM2-135M-Instruct" -> the prepared default model (``convert(cache_dir)`` makes it); a
    published model directory (v* versions, see crescent.models.published) -> its newest valid version; anything
    else an existing HF-format folder."""
    if str(name_or_path) in ("default", DEFAULT_MODEL_NAME):
        target = default_model_dir(cache_dir)
        if (target / COMPLETE_MARKER).is_file():
            return target
        if convert is None:
            raise ModelLoadError(f"the default model is not prepared in {target.parent}: run `crescent model prepare`")
        return convert(cache_dir)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        cached = hf_cache_snapshot(str(name_or_path))
        if cached is None:
            raise ModelLoadError(f"model {str(name_or_path)!r} is neither 'default' nor an existing model folder, "
                                 "nor a Hugging Face model id in the local HF cache (crescent never downloads at run "
                                 "time: `huggingface-cli download ORG/NAME` first)")
        path = cached
    if (path / "config.json").is_file():
        return path
    try:
        return newest_valid_version(path)
    except CheckpointError as e:
        raise ModelLoadError(f"{path} has no config.json and no valid published version: point at an HF-format "
                             f"model folder ({e})") from e


def hf_cache_snapshot(model_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot of ``ORG/NAME`` (its main revision), or None when it is not cached.

    Offline by construction (``local_files_only``): HF_HUB_CACHE / HF_HOME say where the cache is, as for every
    Hugging Face tool.
    """
    if model_id.count("/") != 1 or model_id.startswith(("/", ".", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None
