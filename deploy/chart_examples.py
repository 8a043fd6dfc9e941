"""Render the Helm chart for each values file in helm/crescent/ci/ into helm/crescent/examples/ (checked in).

Also copies the alert rules and the Grafana dashboard into helm/crescent/files/ (Helm reads only files inside the
chart). Regenerate: ``.venv/bin/python deploy/chart_examples.py``; ``--check`` exits 1 when anything is stale.
Rendering is offline (helm-python-sdk binds Helm's Go SDK; no cluster, no helm binary).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART_DIR = Path(__file__).resolve().parent.parent / "helm" / "crescent"
CI_DIR = CHART_DIR / "ci"
EXAMPLES_DIR = CHART_DIR / "examples"
DEPLOY_DIR = Path(__file__).resolve().parent
# chart copy -> source of truth
CHART_FILES = {
    CHART_DIR / "files" / "alerts.yml": DEPLOY_DIR / "prometheus" / "alerts.yml",
    CHART_DIR / "files" / "crescent-dashboard.json": DEPLOY_DIR / "grafana" / "crescent-dashboard.json",
}
RELEASE = "crescent"
NAMESPACE = "serving"
SUFFIX = "-values.yaml"


def cases() -> dict[str, Path]:
    """Example name -> its values file (helm/crescent/ci/<name>-values.yaml)."""
    return {p.name[: -len(SUFFIX)]: p for p in sorted(CI_DIR.glob(f"*{SUFFIX}"))}


def load_values(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict[str, Any]) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would print them (NOTES.txt included)."""
    with helm.Chart.load(CHART_DIR) as chart:
        return chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in a render (NOTES.txt and empty documents dropped)."""
    docs: list[dict[str, Any]] = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(rendered[path]) if d)
    return docs


def example_text(rendered: dict[str, str]) -> str:
    """One multi-document YAML file in template order, each part headed by its source like `helm template`."""
    parts = []
    for path in sorted(rendered):
        text = rendered[path].strip()
        if path.endswith("NOTES.txt") or not text:
            continue
        parts.append(f"---\n# Source: {path}\n{text}\n")
    return "".join(parts)


def expected_examples() -> dict[Path, str]:
    return {EXAMPLES_DIR / f"{name}.yaml": example_text(render(load_values(path))) for name, path in cases().items()}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale_files = sorted(str(c) for c, src in CHART_FILES.items() if not c.exists() or c.read_text() != src.read_text())
    if not check:
        for copy, source in CHART_FILES.items():
            copy.parent.mkdir(exist_ok=True)
            copy.write_text(source.read_text())
        stale_files = []
    expected = expected_examples()
    stale = stale_files + sorted(str(p) for p, text in expected.items() if not p.exists() or p.read_text() != text)
    extra = sorted(str(p) for p in EXAMPLES_DIR.glob("*.yaml") if p not in expected)
    if check:
        for path in stale + extra:
            print(f"stale: {path}", file=sys.stderr)
        if stale or extra:
            print("regenerate with: .venv/bin/python deploy/chart_examples.py", file=sys.stderr)
            return 1
        return 0
    EXAMPLES_DIR.mkdir(exist_ok=True)
    for path in extra:
        Path(path).unlink()
    for path, text in expected.items():
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
