"""Linear classifier probes for every layer of a network at every checkpoint."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("probecvx")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
