"""The package version, alone in its module: any module may import it without importing the package face."""

__version__ = "0.1.0"
