"""The wire format of documents on the 0MQ proxy: msgpack with numpy, never pickle.

:func:`packb` and :func:`unpackb` are ``msgpack_numpy``'s encoding (so peers
using ``msgpack_numpy.packb`` / ``unpackb`` interoperate, and so does
bluesky's ``Publisher(serializer=packb)``), behind a guard: arrays of Python
objects, which msgpack-numpy would pickle, are refused both ways, so bytes
from the network never run code here. Decoded arrays are writable copies, as
pickle gives. pickle itself is available only when asked for by name
(:func:`serialization`).
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, Literal

import msgpack
import msgpack_numpy
import numpy as np

from .errors import ConfigError, CrystalMappingError

__all__ = ["DecodeError", "SERIALIZERS", "packb", "unpackb", "serialization"]

#: Names accepted by :func:`serialization` (and ``--serializer``).
SERIALIZERS = ("msgpack", "pickle")


class DecodeError(CrystalMappingError, ValueError):
    """Bytes from the network that are not a document this module accepts."""


def _encode(obj):
    """msgpack ``default`` hook: msgpack-numpy's, refusing what it would pickle."""
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise TypeError(
            f"cannot send an array of Python objects (dtype {obj.dtype}) with msgpack: it "
            "would need pickle. Convert it to a numeric or string array, or a list."
        )
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    out = msgpack_numpy.encode(obj)
    if out is obj:
        raise TypeError(
            f"cannot serialize {type(obj).__name__} {obj!r:.80} with msgpack; documents hold "
            "dicts, lists, strings, numbers, None and numpy arrays."
        )
    return out


def _str(x):
    return x.decode() if isinstance(x, bytes) else x


def _dtype(descr) -> np.dtype:
    """The dtype a msgpack-numpy ``type`` entry describes (bytes as str, fields as tuples)."""
    if isinstance(descr, (list, tuple)):
        descr = [tuple(_str(x) if not isinstance(x, list) else _fields(x) for x in field)
                 for field in descr]
    return np.dtype(_str(descr))


def _fields(x):
    return [tuple(_fields(y) if isinstance(y, list) else _str(y) for y in f) for f in x] \
        if x and isinstance(x[0], list) else x


def _decode(obj: dict):
    """msgpack ``object_hook``: msgpack-numpy's, refusing what it would unpickle.

    The dtype is checked before msgpack-numpy builds the array: an object
    dtype over the message's bytes would read them as pointers.
    """
    if b"nd" in obj:
        try:
            dtype = _dtype(obj[b"type"])
        except Exception as exc:
            raise DecodeError(f"a numpy entry has no valid dtype ({type(exc).__name__}: "
                              f"{exc}).") from None
        if obj.get(b"kind") == b"O" or dtype.hasobject:
            raise DecodeError(f"refused an array of Python objects (dtype {dtype}): no pickle "
                              "or pointers from the network.")
        try:
            value = msgpack_numpy.decode(obj)
        except Exception as exc:
            raise DecodeError(f"a numpy entry does not decode ({type(exc).__name__}: {exc}).") \
                from None
        if isinstance(value, np.ndarray):
            return value.copy()  # writable, and not a view of the message
        return value
    return msgpack_numpy.decode(obj)


def packb(doc: Any) -> bytes:
    """Serialize a document with msgpack; numpy arrays and scalars included.

    Examples
    --------
    >>> import numpy as np
    >>> doc = unpackb(packb({"data": {"img": np.arange(6, dtype="<u2").reshape(2, 3)}}))
    >>> doc["data"]["img"].dtype, doc["data"]["img"].shape
    (dtype('uint16'), (2, 3))
    """
    return msgpack.packb(doc, default=_encode, use_bin_type=True)


def unpackb(data: bytes) -> dict:
    """Deserialize one msgpack document (the inverse of :func:`packb`); never unpickles.

    Raises
    ------
    DecodeError
        If the bytes are not msgpack, hold an array of Python objects, or do
        not decode to a mapping.
    """
    try:
        doc = msgpack.unpackb(data, object_hook=_decode, raw=False, strict_map_key=False)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"not a msgpack document ({type(exc).__name__}: {exc}).") from None
    if not isinstance(doc, dict):
        raise DecodeError(f"a document must be a mapping, got a {type(doc).__name__}.")
    return doc


def _pickle_loads(data: bytes):
    return pickle.loads(data)  # noqa: S301 - only when asked for by name


def serialization(name: Literal["msgpack", "pickle"] = "msgpack") -> tuple[Callable, Callable]:
    """The ``(dumps, loads)`` pair of a serializer name.

    Parameters
    ----------
    name : {"msgpack", "pickle"}
        ``"msgpack"``: :func:`packb` / :func:`unpackb` (safe; the default).
        ``"pickle"``: bluesky's default; only on a trusted network, since
        anyone who can reach the proxy can then run code in the receiver.
    """
    if name == "msgpack":
        return packb, unpackb
    if name == "pickle":
        return pickle.dumps, _pickle_loads
    raise ConfigError(f"serializer must be one of {list(SERIALIZERS)}, got {name!r}.")
