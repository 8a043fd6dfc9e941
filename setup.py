"""Packages for setuptools: the import root is ``crescent``, and three of its subpackages live at the repo root.

The tree's top level is the one the platform's users asked for (``services/``, ``kernels/``, ``training/`` beside
``proto/``, ``deploy/``, ``helm/``, ``tests/``), while imports stay ``crescent.services...``: a bare top-level
``kernels`` would collide with Hugging Face's ``kernels`` package, which transformers imports. Everything else
(metadata, dependencies, tools) is in pyproject.toml.

``crescent/services``, ``crescent/kernels`` and ``crescent/training`` are relative symbolic links to the root
folders, so tools that walk a source tree rather than import it (import-linter, a plain ``PYTHONPATH=.``) see one
``crescent`` package too; the packages built here come from the root folders themselves.
"""

from setuptools import find_packages, setup

ROOT_SUBPACKAGES = ("services", "kernels", "training")

package_dir = {"crescent": "crescent"}
packages = {name for name in find_packages(include=["crescent", "crescent.*"])
            if name.split(".")[1:2] not in ([top] for top in ROOT_SUBPACKAGES)}  # not through the links below
for top in ROOT_SUBPACKAGES:
    package_dir[f"crescent.{top}"] = top
    packages.update(f"crescent.{name}" for name in find_packages(include=[top, f"{top}.*"]))

setup(packages=sorted(packages), package_dir=package_dir)
