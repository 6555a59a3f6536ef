"""Exceptions and warnings of crystalmapping.

Every exception also inherits the built-in exception a caller would expect
(``ValueError`` for bad values, ``TypeError`` for bad types, ...), so code
that catches the built-ins keeps working. Messages say the rule that was
broken, the value received and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CrystalMappingError",
    "ConfigError",
    "ConfigTypeError",
    "ScanError",
    "StoreError",
    "EmptyImageWarning",
    "NoPeaksWarning",
]


class CrystalMappingError(Exception):
    """Base class of every error raised on purpose by crystalmapping."""


class ConfigError(CrystalMappingError, ValueError):
    """A parameter has a value outside its valid range or set of choices."""


class ConfigTypeError(CrystalMappingError, TypeError):
    """A parameter has the wrong type, or a keyword is not known."""


class ScanError(CrystalMappingError, ValueError):
    """A run cannot be mapped as it is (no grid metadata, missing data key, ...)."""


class StoreError(CrystalMappingError, OSError):
    """A map store cannot be written or read (target exists, wrong schema, ...)."""


class EmptyImageWarning(RuntimeWarning):
    """A preprocessed image is all zeros: the background is as bright as the frames.

    A ``RuntimeWarning``, like :class:`NoPeaksWarning`, not a ``UserWarning``: on
    Python before 3.14 the warning filters are one list for the whole process, and
    pandas and FastAPI (the embedded catalog's server) switch ``UserWarning`` off
    for a moment, from other threads, many times a second; a ``UserWarning`` the
    pipeline gave at that moment was lost.
    """


class NoPeaksWarning(RuntimeWarning):
    """No peak was found in an image or in a whole scan (see :class:`EmptyImageWarning`)."""
