"""Storage behind an export: one small interface, several implementations."""

from nbdworker.backends.base import STATE_HOLE, STATE_ZERO, Backend, Extent
from nbdworker.backends.file import FileBackend
from nbdworker.backends.memory import MemoryBackend

__all__ = ["STATE_HOLE", "STATE_ZERO", "Backend", "Extent", "FileBackend", "MemoryBackend"]
