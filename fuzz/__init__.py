"""Fuzz targets and the atheris driver for the NBD protocol engine (docs/fuzzing.md)."""
