"""Input checks shared by the metrics: arrays from numpy or torch (any device), finite real values,
binary labels and masks. Bad inputs raise ``ValueError`` naming what is wrong."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_binary", "as_float_array", "check_finite", "to_numpy"]


def to_numpy(x: Any) -> np.ndarray:
    """``x`` as a numpy array; torch tensors are detached and moved to the CPU first."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def check_finite(x: np.ndarray, name: str) -> None:
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise ValueError(f"{name} contain {bad} non-finite value(s) (NaN or inf) out of {x.size}")


def as_float_array(x: Any, name: str) -> np.ndarray:
    """Real-valued array of ``x``, kept in float32/float64 when already floating, else float64."""
    a = to_numpy(x)
    if a.dtype.kind == "b" or a.dtype.kind in "iu":
        a = a.astype(np.float64)
    elif a.dtype.kind != "f":
        try:
            a = a.astype(np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be real numbers; got dtype {a.dtype}") from e
    check_finite(a, name)
    return a


def as_binary(x: Any, name: str) -> np.ndarray:
    """Boolean array of ``x``, which must hold only 0/1 (or False/True)."""
    a = to_numpy(x)
    if a.dtype.kind == "b":
        return a
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be 0/1 or boolean; got dtype {a.dtype}")
    is_one = a == 1
    if not np.all(is_one | (a == 0)):
        extra = np.unique(a[~(is_one | (a == 0))])
        shown = ", ".join(repr(v.item()) for v in extra[:5])
        raise ValueError(
            f"{name} must hold only 0 and 1 (or False/True); also found {shown}"
            + (" ..." if extra.size > 5 else "")
            + (" (binarise e.g. with `mask > 0`)" if name == "masks" else "")
        )
    return is_one
