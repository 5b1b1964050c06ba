"""Errors of the teacher cache."""


class CacheError(Exception):
    """Base class of the teacher-cache errors."""


class CacheMismatchError(CacheError, ValueError):
    """The cache was written for another tokenizer, dataset or setting than the one it is used with."""


class CacheCorruptError(CacheError, OSError):
    """A cache file is missing, truncated, or fails its checksum."""


class CacheWriteError(CacheError, OSError):
    """A cache file could not be written (e.g. the disk is full); the files already written stay valid."""
