"""The library's version, recorded in every influence file."""

__version__ = "0.1.0"
