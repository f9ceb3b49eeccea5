"""Storage behind an export: one small interface, several implementations."""

from nbdworker.backends.base import Backend, Extent
from nbdworker.backends.file import FileBackend
from nbdworker.backends.memory import MemoryBackend

__all__ = ["Backend", "Extent", "FileBackend", "MemoryBackend"]
