"""Checks on what arrives over the network before it names a file.

A live server receives bluesky documents from anyone who can reach the 0MQ
proxy. Two of their fields would otherwise steer the filesystem:

* a run's ``uid`` becomes the name of its store, ``out_dir/<uid>.zarr``:
  :func:`check_uid` accepts only a plain name (a UUID, or the letters,
  digits, ``-``, ``_`` and ``.`` a uid may hold), so no uid reaches outside
  ``out_dir``;
* a ``stream_resource`` names the HDF5 file a worker opens:
  :func:`check_data_path` accepts only a file under the *data roots* the
  server was told to read (``serve --data-root``), after symbolic links and
  ``..`` are resolved.

Both raise :class:`UntrustedDocumentError`; the server logs it, refuses the
run or its points, and writes or opens nothing.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

from .errors import ConfigError, ScanError

__all__ = ["UntrustedDocumentError", "check_uid", "parse_data_roots", "check_data_path"]

#: A uid that can be a file name: starts with a letter or digit, at most 128 characters.
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class UntrustedDocumentError(ScanError):
    """A document asks for a file name or a file the server must not use."""


def check_uid(uid) -> str:
    """``uid`` if it is a plain name a store can be named after.

    Raises
    ------
    UntrustedDocumentError
        If it is not a string of letters, digits, ``-``, ``_`` and ``.``
        starting with a letter or digit (at most 128 characters): a path,
        ``..``, an empty or absent uid.

    Examples
    --------
    >>> check_uid("5f0e4a4c-2b36-4a0e-9a0e-3c1f6b2f9d11")
    '5f0e4a4c-2b36-4a0e-9a0e-3c1f6b2f9d11'
    >>> check_uid("../../etc/cron.d/x")
    Traceback (most recent call last):
    ...
    crystalmapping.trust.UntrustedDocumentError: run uid '../../etc/cron.d/x' is not a plain name ...
    """
    if not isinstance(uid, str) or not _PLAIN.fullmatch(uid):
        shown = repr(uid)[:80]
        raise UntrustedDocumentError(
            f"run uid {shown} is not a plain name (letters, digits, '-', '_', '.', starting "
            "with a letter or digit, at most 128 characters), so it cannot name a store; "
            "nothing is written for this run. bluesky's RunEngine gives every run a UUID: "
            "check what publishes to this proxy."
        )
    return uid


def parse_data_roots(roots: Iterable[str | os.PathLike] | str | os.PathLike | None
                     ) -> tuple[str, ...] | None:
    """The data roots as resolved absolute paths (``None``: no restriction).

    Raises
    ------
    ConfigError
        If a root is empty or not an existing directory.
    """
    if roots is None:
        return None
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    out = []
    for root in roots:
        if not str(root).strip():
            raise ConfigError("a data root is empty; give the directory the detector writes "
                              "to, e.g. --data-root /data/detector.")
        path = os.path.realpath(os.path.expanduser(os.fspath(root)))
        if not os.path.isdir(path):
            raise ConfigError(
                f"data root {os.fspath(root)!r} is not an existing directory; give the "
                "directory the detector's files are written to (or seen under, with "
                "--root-map), e.g. --data-root /data/detector."
            )
        out.append(path)
    return tuple(out)


def check_data_path(path: str, roots: tuple[str, ...] | None) -> str:
    """``path`` if it lies under one of ``roots`` once resolved (``roots=None``: any path).

    Raises
    ------
    UntrustedDocumentError
        If the resolved path is outside every root.

    Examples
    --------
    >>> check_data_path("/data/x/../../etc/passwd", ("/data",))
    Traceback (most recent call last):
    ...
    crystalmapping.trust.UntrustedDocumentError: a document names the file '/data/x/../../etc/passwd' ...
    """
    if roots is None:
        return path
    real = os.path.realpath(path)
    for root in roots:
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return path
    where = ", ".join(repr(r) for r in roots) if roots else "none were given"
    raise UntrustedDocumentError(
        f"a document names the file {path!r} (resolved: {real!r}), outside the data roots "
        f"this server reads ({where}); it is not opened. If the detector really writes "
        "there, start the server with --data-root for that directory."
    )
