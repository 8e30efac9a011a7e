"""Bounds on what one input may cost, shared by the command line (defaults in --help) and the converters."""

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own warning threshold (1 GiB of RGBA / 4 / 3): about 9,459 x 9,459
DEFAULT_MAX_GUNZIP_BYTES = 4 << 30  # a gzip-compressed inner tar may decompress to at most this many bytes ...
GUNZIP_MAX_RATIO = 100  # ... and to at most this many times its compressed size (JPEG tars barely compress)
