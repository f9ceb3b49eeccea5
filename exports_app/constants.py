"""Named limits. The NBD ones are the worker's own (nbdworker.contract.config), so that the web
side never accepts an export the worker's parser would refuse."""

from nbdworker.contract.config import MAX_DESCRIPTION_BYTES, MAX_NAME_BYTES, MAX_PAYLOAD
from nbdworker.contract.config import MAX_MIN_BLOCK as MAX_MIN_BLOCK_SIZE

__all__ = [
    "DEFAULT_MAX_BLOCK_SIZE",
    "DEFAULT_MIN_BLOCK_SIZE",
    "DEFAULT_PREFERRED_BLOCK_SIZE",
    "MAX_DESCRIPTION_BYTES",
    "MAX_EXPORT_SIZE",
    "MAX_IMAGE_PATH_BYTES",
    "MAX_MIN_BLOCK_SIZE",
    "MAX_NAME_BYTES",
    "MAX_PAYLOAD",
    "MAX_VALIDITY_DAYS",
    "SECTOR_SIZE",
]

# Every export size is a multiple of a sector: the Linux kernel client and qemu assume it.
SECTOR_SIZE = 512
# Images are files: off_t is signed 64-bit. The largest multiple of 512 below 2**63.
MAX_EXPORT_SIZE = 2**63 - SECTOR_SIZE

# Block size defaults advertised with NBD_INFO_BLOCK_SIZE.
DEFAULT_MIN_BLOCK_SIZE = 1
DEFAULT_PREFERRED_BLOCK_SIZE = 4096
DEFAULT_MAX_BLOCK_SIZE = MAX_PAYLOAD

# Relative image paths are unique per node; keeping them short keeps that index within
# PostgreSQL's btree row limit (about 2.7 kB).
MAX_IMAGE_PATH_BYTES = 1024

# Ten years: long-lived CAs are common, unbounded ones are a typo.
MAX_VALIDITY_DAYS = 3650
