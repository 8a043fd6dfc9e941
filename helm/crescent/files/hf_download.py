"""Download one Hugging Face Hub model revision into a folder: the chart's init container for model.source=huggingface.

Standard library only, so it runs in the crescent image (or any Python 3.10+ image) without huggingface_hub.
Configured by env (set by the chart):
  HF_MODEL_ID    e.g. HuggingFaceTB/SmolLM2-135M-Instruct
  HF_REVISION    branch, tag or commit (default main)
  HF_ENDPOINT    the Hub (default https://huggingface.co)
  HF_TOKEN       optional: a token for gated or private models
  HF_FILES       JSON list of glob patterns of the files to fetch
  HF_DEST        the folder to fill; it holds the model once `.crescent-complete` is written into it

A pod whose init container restarts keeps its emptyDir: a folder already complete for the same commit is reused.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
import urllib.parse
import urllib.request
from pathlib import Path

MARKER = ".crescent-complete"
TIMEOUT_S = 60.0  # per connection attempt and per read, not per file: big files stream for as long as they need


class _DropAuthOnNewHost(urllib.request.HTTPRedirectHandler):
    """Large files redirect to a CDN with a signed URL: the Hub token must not follow them to another host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def _open(url: str, token: str):
    request = urllib.request.Request(url, headers={"User-Agent": "crescent-hf-download"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    return urllib.request.build_opener(_DropAuthOnNewHost).open(request, timeout=TIMEOUT_S)


def plan(endpoint: str, model_id: str, revision: str, patterns: list[str], token: str) -> tuple[str, list[str]]:
    """The commit the revision points at, and the repository files matching the patterns."""
    quoted = urllib.parse.quote(revision, safe="")
    with _open(f"{endpoint}/api/models/{model_id}/revision/{quoted}", token) as response:
        info = json.load(response)
    names = [s["rfilename"] for s in info.get("siblings", [])]
    wanted = sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns))
    if not any(n.endswith(".safetensors") for n in wanted) or "config.json" not in wanted:
        raise SystemExit(f"{model_id}@{revision}: no config.json and *.safetensors among the files matching "
                         f"{patterns}; crescent serves HF-format folders (got {names})")
    return info.get("sha") or revision, wanted


def download(endpoint: str, model_id: str, commit: str, files: list[str], dest: Path, token: str) -> None:
    """Fetch into a sibling temp folder, then rename it into place: a crash never leaves half a model at dest."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for name in files:
        target = partial / name
        target.parent.mkdir(parents=True, exist_ok=True)
        url = f"{endpoint}/{model_id}/resolve/{commit}/{urllib.parse.quote(name)}"
        with _open(url, token) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
        print(f"fetched {name} ({target.stat().st_size} bytes)", flush=True)
    (partial / MARKER).write_text(commit + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)


def main() -> int:
    env = os.environ
    model_id, dest = env["HF_MODEL_ID"], Path(env["HF_DEST"])
    endpoint = env.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    token = env.get("HF_TOKEN", "")
    commit, files = plan(endpoint, model_id, env.get("HF_REVISION", "main"), json.loads(env["HF_FILES"]), token)
    if (dest / MARKER).is_file() and (dest / MARKER).read_text().strip() == commit:
        print(f"{dest} already holds {model_id}@{commit}")
        return 0
    download(endpoint, model_id, commit, files, dest, token)
    print(f"{model_id}@{commit}: {len(files)} files in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
