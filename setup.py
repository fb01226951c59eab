"""Packaging beyond pyproject.toml: configs/ is shipped inside the package as ``ldm/configs``, so that a
non-editable install (``pip install .``) finds its default configs (ldm.core.paths)."""

from pathlib import Path

from setuptools import find_packages, setup

CONFIG_PACKAGES = ["ldm.configs"] + [f"ldm.configs.{d.name}" for d in sorted(Path("configs").iterdir()) if d.is_dir()]

setup(
    packages=find_packages(include=["ldm*"]) + CONFIG_PACKAGES,
    package_dir={"ldm.configs": "configs"},
    package_data={**{package: ["*.yaml"] for package in CONFIG_PACKAGES}, "ldm.serve": ["static/*"]},
)
