"""The version of ecloss-fast: read by pyproject.toml (setuptools) and by the package."""
__version__ = "0.1.0"
