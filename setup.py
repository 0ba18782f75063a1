"""Packaging that pyproject.toml cannot express: conf/ stays at the repository root (Hydra's layout for the
checkout and tasks/*.py) and ships inside the wheel as the package data directory hirespath/conf, where the
``hirespath`` command finds it (hirespath.cli.config_dir). An editable install uses the checkout's conf/."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages("src"), "hirespath.conf"],
    package_dir={"": "src", "hirespath.conf": "conf"},
    package_data={"hirespath.conf": ["*.yaml", "**/*.yaml"]},
)
