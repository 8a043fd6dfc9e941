"""Which published checkpoint version to serve, and when a newer one may replace it (pure bookkeeping).

A model setting that names a *published model directory* (``<model_dir>/<name>/`` holding ``v000200/``,
``v000400/``..., written by :func:`crescent.training.publish.publish_checkpoint`) is served at its newest valid
version and watched for newer ones. Workers and the gateway each keep one :class:`ModelWatcher`:

- the served NAME (``<name>`` or ``served_model_name``) is what clients send and what the conductor matches
  instances on: it never changes across versions;
- the block-hash namespace is ``<name>@<version>`` (:func:`versioned_model_id`): KV computed by one version's
  weights can never be found under another version's hashes, in a worker's prefix cache, the store or the
  conductor's KV index.

A version that fails validation (or, in a worker, fails to load) is refused once, with one log line naming it and
the problem, and never retried: versions are immutable, so retrying could only fail again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from crescent.models.published import (
    is_published_dir,
    published_versions,
    validate_checkpoint,
    version_number,
    versioned_model_id,
)

log = logging.getLogger(__name__)



class ModelWatcher:
    """Tracks the served version of one published model directory and picks the next one to load.

    ``validate`` raises (``CheckpointError`` or any ValueError/OSError) on a broken version. The watcher never
    loads models itself: a worker calls :meth:`poll`, loads what it returns, then :meth:`accept` or :meth:`refuse`.
    """

    def __init__(self, root: str | Path, name: str = "",
                 validate: Callable[[Path], None] = validate_checkpoint):
        self.root = Path(root).expanduser()
        self.name = name or self.root.name
        self.validate = validate
        self.current: Path | None = None
        self.refused: dict[str, str] = {}  # version folder name -> why

    @property
    def version(self) -> str:
        """The served version's folder name ("" before the first accept)."""
        return self.current.name if self.current is not None else ""

    @property
    def model_id(self) -> str:
        """The block-hash namespace of the served version (the bare name before the first accept)."""
        return versioned_model_id(self.name, self.version) if self.current is not None else self.name

    def candidates(self) -> list[Path]:
        """Published versions newer than the served one and not refused, newest first (not yet validated)."""
        floor = version_number(self.version) if self.current is not None else -1
        return [p for p in reversed(published_versions(self.root))
                if version_number(p.name) > floor and p.name not in self.refused]

    def poll(self) -> Path | None:
        """The newest valid version newer than the served one, or None. Broken ones are refused on the way
        (so an older valid version still gets served when the newest is broken)."""
        for path in self.candidates():
            try:
                self.validate(path)
            except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
                self.refuse(path, str(exc))
                continue
            return path
        return None

    def refuse(self, path: Path, reason: str) -> None:
        """Never consider ``path`` again; one error line names the version and the problem."""
        if path.name in self.refused:
            return
        self.refused[path.name] = reason
        keeps = f"keeps serving {self.version}" if self.current is not None else "nothing served yet"
        log.error("model %s: refused version %s: %s (%s)", self.name, path.name, reason, keeps)

    def accept(self, path: Path) -> None:
        previous = self.version
        self.current = Path(path)
        log.info("model %s: serving version %s%s", self.name, self.version,
                 f" (was {previous})" if previous else "")

    def describe(self) -> dict:
        """What /v1/models shows: the served version, the servable ones (newest first) and the refused ones."""
        versions = [p.name for p in reversed(published_versions(self.root)) if p.name not in self.refused]
        return {"version": self.version, "versions": versions, "refused_versions": dict(self.refused)}


def watcher_for(model: str, served_model_name: str = "") -> ModelWatcher | None:
    """A watcher when the ``model`` setting names a published model directory, else None (a plain folder)."""
    if model in ("", "default") or not is_published_dir(model):
        return None
    return ModelWatcher(model, served_model_name)


def first_version(watcher: ModelWatcher) -> Path:
    """The newest valid version to start serving; raises ValueError naming the folder when there is none."""
    path = watcher.poll()
    if path is None:
        refused = "; ".join(f"{v}: {why}" for v, why in watcher.refused.items()) or "no v* version folders"
        raise ValueError(f"{watcher.root} holds no valid published version ({refused})")
    return path
