"""Training checkpoints that resume exactly: weights, optimizer, RNG states and the data position (the step).

These are the trainer's private files (``<run>/checkpoints/step_000200.pt``); the serving-side format is the HF
folder written by :mod:`crescent.training.publish`.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"^step_(\d{6,})\.pt$")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: Any | None,
                    extra: dict[str, Any]) -> Path:
    """Write ``step_<step>.pt`` atomically (temp file + rename): a crash never leaves a half checkpoint.

    ``optimizer`` is None when there is no state worth keeping (k1.5 resets it every iteration).
    """
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.pt"
    tmp = folder / f".{path.name}.tmp"
    torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer is not None else {},
                "rng": rng_state(), **extra}, tmp)
    os.replace(tmp, path)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    return found[-1][1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        # weights_only=False: the RNG states are numpy/python objects; these files are our own.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated/corrupt file surfaces as many exception types
        raise ValueError(f"checkpoint {path} cannot be read ({e}); delete it to resume from the previous one") from e
