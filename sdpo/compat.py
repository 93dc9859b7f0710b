"""Work-arounds for other packages' import-time side effects that the project can undo itself."""

from __future__ import annotations

import sys
import typing

_PATCHED = ("_check_generic", "_collect_parameters", "_collect_type_vars")


def restore_typing_patches() -> bool:
    """Put back the real ``typing_extensions``' patches of :mod:`typing` over those of metaflow's vendored copy.

    On Python 3.11 both copies replace ``typing._check_generic`` / ``typing._collect_parameters``, each checking type
    parameter defaults against its own "no default" marker. When metaflow's copy is imported after the real one
    (``metaflow.Runner`` does it), every TypeVar of the real ``typing_extensions`` seems to have a default, and torch,
    transformers or diffusers imported afterwards fail with "Type parameter ... without a default follows type
    parameter with a default". Call this before importing them; it does nothing when the trap is not set. Returns
    whether it restored anything.
    """
    real = sys.modules.get("typing_extensions")
    if real is None or "metaflow._vendor.typing_extensions" not in sys.modules:
        return False
    restored = False
    for name in _PATCHED:
        fn = getattr(real, name, None)
        if fn is not None and hasattr(typing, name) and getattr(typing, name) is not fn:
            setattr(typing, name, fn)
            restored = True
    return restored
