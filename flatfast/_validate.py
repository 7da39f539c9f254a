"""Input checks shared by the public functions. Every message names the offending argument."""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def is_torch(x: Any) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch") and hasattr(x, "detach")


def device_of(x: Any) -> str:
    """'cuda' for a CUDA torch tensor, 'cpu' for everything else."""
    return "cuda" if is_torch(x) and x.device.type == "cuda" else "cpu"


def as_float_matrix(x: Any, name: str, *, allow_empty: bool = True):
    """Check that x is a finite 2-D real array (numpy or torch); returns it unchanged in kind."""
    if is_torch(x):
        if x.is_complex() or not (x.is_floating_point() or x.dtype in _torch_int_dtypes()):
            raise TypeError(f"{name}: expected a real floating-point tensor, got dtype {x.dtype}")
        ndim, shape = x.dim(), tuple(x.shape)
    else:
        if isinstance(x, (str, bytes)) or x is None:
            raise TypeError(f"{name}: expected a 2-D array, got {type(x).__name__}")
        x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{name}: expected a real numeric array, got dtype {x.dtype}")
        ndim, shape = x.ndim, x.shape
    if ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (points x features), got {ndim}-D with shape {shape}")
    if shape[1] == 0:
        raise ValueError(f"{name}: has zero feature columns (shape {shape})")
    if not allow_empty and shape[0] == 0:
        raise ValueError(f"{name}: has no rows (shape {shape})")
    if not _all_finite(x):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def _torch_int_dtypes():
    import torch

    return (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)


def _all_finite(x) -> bool:
    if is_torch(x):
        import torch

        return bool(torch.isfinite(x).all()) if x.is_floating_point() else True
    return bool(np.isfinite(x).all()) if x.dtype.kind == "f" else True


def check_int(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return int(value)


def check_float(value: Any, name: str, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name}: must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name}: must be >= 0, got {value}")
    return value


def float_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """numpy.float64/float32, their torch or string spellings -> a numpy dtype; anything else is an error."""
    spelled = str(dtype).replace("torch.", "")
    try:
        resolved = np.dtype(spelled if spelled in ("float32", "float64", "double", "float") else dtype)
    except TypeError:
        raise TypeError(f"{name}: expected float64 or float32, got {dtype!r}") from None
    if spelled == "float":  # torch.float is float32
        resolved = np.dtype(np.float32)
    if resolved not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise ValueError(f"{name}: expected float64 or float32, got {dtype!r}")
    return resolved


def memory_guard(n_bytes: float, what: str, *, fraction: float = 0.8, available=None) -> None:
    """Fail early, with the size, when an allocation would not fit in the available memory: the machine's, or
    ``available`` bytes (a GPU's free memory)."""
    available = _available_bytes() if available is None else available
    if available is not None and n_bytes > fraction * available:
        raise MemoryError(f"{what} needs {_size(n_bytes)}, more than {fraction:.0%} of the {_size(available)} of "
                          "memory available")


def _size(n_bytes):
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def _available_bytes():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def same_kind(result_np: np.ndarray, like: Any):
    """Return result_np as the same kind of array as `like` (numpy, or a torch tensor on like's device)."""
    if is_torch(like):
        import torch

        return torch.from_numpy(result_np).to(like.device)
    return result_np


def to_numpy(x: Any) -> np.ndarray:
    if is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)
