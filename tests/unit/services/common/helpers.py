"""Published-version folders and a fake checkpoint validator, for the watcher's and the worker's reload tests."""

from __future__ import annotations

from pathlib import Path


def make_versions(root: Path, *names: str) -> list[Path]:
    for name in names:
        (root / name).mkdir(parents=True)
    return [root / n for n in names]


class FakeValidate:
    """Raises for the version names in ``broken``; counts calls per version."""

    def __init__(self, *broken: str):
        self.broken = set(broken)
        self.calls: dict[str, int] = {}

    def __call__(self, path: Path) -> None:
        self.calls[path.name] = self.calls.get(path.name, 0) + 1
        if path.name in self.broken:
            raise ValueError(f"{path / 'model.safetensors'} does not match its sha256")
