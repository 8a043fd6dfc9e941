"""vLLM as a bench/engine contender: one subprocess per dtype in .venv-vllm (see vllm_engine_run.py).

The same token ids go to vLLM as to crescent's engine; the answer comes back as JSON in the shape runners.py's
crescent functions return, so the caller summarizes both alike. Bounded by ``timeout_s`` per dtype.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "vllm_engine_run.py"


def vllm_python(venv: Path) -> Path | None:
    """.venv-vllm's python when `make vllm` made it, else None (the caller records vLLM as not run)."""
    py = venv / "bin" / "python"
    return py if py.is_file() and (venv / "bin" / "vllm").is_file() else None


def engine_args(settings) -> dict:
    """vLLM engine arguments that match crescent's EngineSettings (batch limits, prefix caching)."""
    return {"max_num_seqs": settings.max_num_seqs, "max_num_batched_tokens": settings.max_num_batched_tokens,
            "enable_prefix_caching": settings.enable_prefix_caching}


def run_vllm(python: Path, model: str, dtype: str, threads: int, engine: dict, single: dict, batches: dict,
             repeats: int, timeout_s: float) -> dict:
    """Run the workloads on vLLM at ``dtype``; returns vllm_engine_run.py's OUT.json."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-vllm-{dtype}-"))
    spec = {"model": model, "dtype": dtype, "repeats": repeats, "engine": engine, "single": single,
            "batches": batches}
    (work / "in.json").write_text(json.dumps(spec))
    # the same cores crescent's engine gets: OpenMP threads bound to the first `threads` CPUs
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND",
                                                                     f"0-{threads - 1}"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(work / "vllm.log", "wb") as log:
        proc = subprocess.run([str(python), str(SCRIPT), str(work / "in.json"), str(work / "out.json")], cwd=REPO,
                              env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
    if proc.returncode != 0 or not (work / "out.json").is_file():
        tail = "\n".join((work / "vllm.log").read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"vLLM ({dtype}) exited {proc.returncode}; log {work / 'vllm.log'}:\n{tail}")
    out = json.loads((work / "out.json").read_text())
    out["log"] = str(work / "vllm.log")
    return out
