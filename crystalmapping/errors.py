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


class EmptyImageWarning(UserWarning):
    """A preprocessed image is all zeros: the background is as bright as the frames."""


class NoPeaksWarning(UserWarning):
    """No peak was found in an image or in a whole scan."""
