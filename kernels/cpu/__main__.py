"""``python -m crescent.kernels.cpu``: build (once per machine) and load the CPU kernels; exit 1 if they cannot be."""

from __future__ import annotations

import logging
import sys

from crescent.kernels import cpu

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not cpu.available():
        print(f"CPU kernels unavailable: {cpu.unavailable_reason()}", file=sys.stderr)
        sys.exit(1)
    print(f"CPU kernels ready under {cpu.cache_dir()}")
