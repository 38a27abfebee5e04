"""The package version, in a module of its own so that anything (the CLI's --version, the package face) can read it
without importing a stage."""

__version__ = "0.1.0"
