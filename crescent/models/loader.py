"""Load and save HF-format model folders: config.json, *.safetensors (sharded too), tokenizer files.

Every problem with a folder is a ``ModelLoadError`` that names the file and what is wrong with it, so a worker
that cannot start says why in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from crescent.models.config import ModelConfig, ModelLoadError
from crescent.models.llama import LlamaForCausalLM
from crescent.services.common.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def load_config(path: str | Path) -> ModelConfig:
    cfg_file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise ModelLoadError(f"model folder {path} does not exist (or is not a folder)")
    if not cfg_file.is_file():
        raise ModelLoadError(f"{cfg_file} is missing: an HF model folder needs config.json")
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{cfg_file} is not valid JSON: {exc}") from exc
    try:
        return ModelConfig.from_hf(hf)
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{cfg_file}: {exc}") from exc


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               config: ModelConfig | None = None) -> tuple[LlamaForCausalLM, Tokenizer, ModelConfig]:
    """Load ``(model, tokenizer, config)``; pass ``config`` to override the folder's (e.g. ``with_attention``).

    The model comes back in eval mode and ``prepare_for_inference()``d (fused projections; training is unaffected:
    the fused path only runs without autograd)."""
    folder = Path(path)
    config = config or load_config(folder)
    try:
        tokenizer = Tokenizer.from_dir(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise ModelLoadError(str(exc)) from exc
    with torch.device("meta"):  # no random init of weights that are overwritten next
        model = LlamaForCausalLM(config)
    state = _read_safetensors(folder)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)  # some tied checkpoints store it anyway
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelLoadError(f"{folder}: missing tensor {missing[0]!r}" + (f" (+{len(missing) - 1} more)"
                                                                        if len(missing) > 1 else ""))
    unexpected = sorted(set(state) - set(expected) - {k for k in state if k.endswith("rotary_emb.inv_freq")})
    if unexpected:
        raise ModelLoadError(f"{folder}: unexpected tensor {unexpected[0]!r} — the weights do not match config.json")
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise ModelLoadError(f"{folder}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                                 f"config.json implies {tuple(ref.shape)}")
    model.load_state_dict({k: state[k].to(dtype) for k in expected}, strict=False, assign=True)
    model.tie_weights()
    return model.to(device).eval().prepare_for_inference(), tokenizer, config


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors weight files")
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index_file} is malformed (needs a 'weight_map' object): {exc}") from exc
        absent = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if absent:
            raise ModelLoadError(f"{index_file} lists shard {absent[0]} which is missing from {folder}")
        files = [folder / f for f in sorted(set(weight_map.values()))]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        except Exception as exc:  # safetensors raises its own SafetensorError for truncated/corrupt files
            raise ModelLoadError(f"{file} cannot be read as safetensors: {exc}") from exc
    return state


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """safetensors refuses tensors sharing storage: copy views (e.g. fused q/k/v slices) out of their parent."""
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        return t.clone(memory_format=torch.contiguous_format)
    return t


def save_model(model: LlamaForCausalLM, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as an HF folder (config.json + model.safetensors), copying tokenizer files if given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: _own_storage(v.detach().to("cpu", dtype or v.dtype)) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = model.config.to_hf()
    hf["torch_dtype"] = str(dtype or next(iter(state.values())).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, out / name)
    return out
