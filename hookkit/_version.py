"""hookkit's version, in one place: read by ``pyproject.toml`` (setuptools), the package and the files it writes."""

__version__ = "0.1.0"
