"""Package layout (the metadata is in pyproject.toml).

The top-level folders compiler/, passes/ and runtime/ are the packages mllmc.compiler,
mllmc.passes and mllmc.runtime. Every folder under them is a subpackage here (namespace
discovery: an __init__.py is not needed, and data folders such as compiler/data/assets are packages
whose files pyproject.toml's package-data selects), so a new one ships in the wheel without an
edit; tests/test_wheel.py checks that each folder holding .py files is in the built wheel.
"""

from setuptools import find_namespace_packages, setup

ROOTS = ("compiler", "passes", "runtime")


def packages() -> list[str]:
    """mllmc.ROOT and mllmc.ROOT.SUB for every subpackage SUB found under each root."""
    return [
        f"mllmc.{root}{'.' + sub if sub else ''}"
        for root in ROOTS
        for sub in ["", *find_namespace_packages(root, exclude=["*__pycache__*"])]
    ]


setup(packages=packages(), package_dir={f"mllmc.{root}": root for root in ROOTS})
