"""C++ kernels for CPU workers, compiled on first use for the machine they run on.

``paged_decode`` is decode attention over the paged KV cache: one query token per sequence, its context read in
place from the cache blocks. The torch path it replaces gathers every sequence's blocks into a buffer and calls
SDPA once per sequence; at long contexts that was most of a decode step here.

The source is compiled with the system C++ compiler (``g++``; the Makefile installs it) against the installed
torch into ``$CRESCENT_KERNEL_CACHE`` (default ``~/.cache/crescent/kernels``), keyed by the source, torch's version
and the CPU's flags, and loaded with ``torch.ops.load_library``. Concurrent processes (the workers of one
``crescent up``) build once: a file lock, and the library is renamed into place whole. When no compiler is there or
the build fails, ``available()`` is False, the reason is logged once, and callers keep their torch path.
``CRESCENT_CPU_KERNELS=0`` turns the kernels off (the torch path, for comparison or as a workaround).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_decode.cpp")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-DNDEBUG", "-w")
_BUILD_TIMEOUT_S = 600
_lock = threading.Lock()
_state: dict[str, object] = {}  # "loaded": True, or "error": the reason it is not


def enabled() -> bool:
    """Not turned off by ``CRESCENT_CPU_KERNELS=0``."""
    return os.environ.get("CRESCENT_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def available() -> bool:
    """The kernels are enabled and loaded (building them first if needed). Never raises."""
    if not enabled():
        return False
    with _lock:
        if not _state:
            try:
                torch.ops.load_library(str(_build()))
                _state["loaded"] = True
            except Exception as exc:  # no compiler, a failed build: keep the torch path, say why once
                _state["error"] = f"{type(exc).__name__}: {exc}"
                log.warning("CPU kernels unavailable, using the torch path: %s", _state["error"])
        return bool(_state.get("loaded"))


def unavailable_reason() -> str | None:
    return None if available() else str(_state.get("error", "turned off by CRESCENT_CPU_KERNELS"))


def paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
                 scale: float | None = None) -> Tensor:
    """``q [B, H, D]`` against each sequence's ``context_lens[b]`` tokens in ``k_cache``/``v_cache``
    ``[num_blocks, block_size, Hkv, D]`` at ``block_tables[b]`` (int32 ``[B, W]``) -> ``[B, H, D]``.
    Call only when ``available()``."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.crescent_cpu.paged_decode(q, k_cache, v_cache, block_tables, context_lens, float(scale))


def cache_dir() -> Path:
    return Path(os.environ.get("CRESCENT_KERNEL_CACHE") or Path.home() / ".cache" / "crescent" / "kernels")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build() -> Path:
    source = _SOURCE.read_bytes()
    key = hashlib.sha1(b"\0".join([source, torch.__version__.encode(), " ".join(_FLAGS).encode(),
                                   _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
    out_dir = cache_dir()
    target = out_dir / f"paged_decode-{key}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"paged_decode-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same library
        if target.exists():
            return target
        from torch.utils import cpp_extension

        torch_lib = Path(torch.__file__).parent / "lib"
        includes = [f"-I{p}" for p in (*cpp_extension.include_paths(), sysconfig.get_paths()["include"])]
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        cmd = [compiler, *_FLAGS, abi, *includes, str(_SOURCE), "-o", tmp, f"-L{torch_lib}",
               f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch"]
        log.info("building CPU kernels: %s", " ".join(cmd))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target
