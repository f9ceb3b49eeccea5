"""`nbdweb`: the command-line client of nbdweb's REST API (standard library only)."""

__version__ = "0.1.0"
