"""File names as text. POSIX file names are bytes; Python holds a name that is not valid
UTF-8 as a ``str`` with lone surrogates (``surrogateescape``), which opens the file but
cannot be written to Parquet, JSON for other tools, SQL, logs or HTML. :func:`path_text`
gives every path a valid UTF-8 form, reversibly: a valid name is itself, any other becomes
its ``file://`` URI with the undecodable bytes percent-encoded (an absolute path never
starts with ``file:``); :func:`path_from_text` turns either back into the name that opens
the file."""

from __future__ import annotations

import os
from urllib.parse import quote, unquote_to_bytes

__all__ = ["is_text_path", "path_from_text", "path_text"]

_URI = "file://"


def is_text_path(path: str) -> bool:
    """True when ``path`` is valid UTF-8 text (no lone surrogates) and not a ``file:`` URI."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not path.startswith(_URI)


def path_text(path: str | os.PathLike[str]) -> str:
    """``path`` as valid UTF-8 text: unchanged when it is, else a ``file://`` URI whose
    undecodable bytes are percent-encoded (``/data/caf\\udce9.png`` ->
    ``file:///data/caf%E9.png``)."""
    text = os.fspath(path)
    if is_text_path(text):
        return text
    return _URI + quote(os.fsencode(text), safe="/")


def path_from_text(text: str) -> str:
    """The file name :func:`path_text` was given (the inverse)."""
    if text.startswith(_URI):
        return os.fsdecode(unquote_to_bytes(text[len(_URI):]))
    return text
