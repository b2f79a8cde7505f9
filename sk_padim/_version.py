"""The version of sk-padim, in one place: the package, its pickles and its build read it."""

__version__ = "0.1.0.dev0"
