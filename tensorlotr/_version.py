"""The package version, read by setuptools (pyproject.toml) and ``tensorlotr --version``."""

__version__ = "0.1.0"
