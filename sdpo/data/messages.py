"""Error text helpers: every data error reaches the user as one line."""

from __future__ import annotations

import re

_MEMORY_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MAX_DETAIL = 400


def one_line(err: BaseException) -> str:
    """An exception as one short line without memory addresses (AWS and PIL messages span lines or run long)."""
    text = _MEMORY_ADDRESS.sub("", " ".join(str(err).split())) or type(err).__name__
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."
