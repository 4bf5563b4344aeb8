"""Element types: the one table of the dtypes a job may use, and the tolerances that go with them.

Pure (no torch): a dtype travels as its canonical name ("float32",
"float16", "bfloat16"); :func:`torch_dtype` turns a name into the torch
dtype where tensors are made, importing torch only then.

Tolerances (``TOLERANCES``) are relative to the dtype's rounding unit
(ulp of 1: 2^-23, 2^-10, 2^-7) and say what "exact" allows for a result
computed in that dtype against a float64 reference:

- ``out``: max |out - ref| per row, as a fraction of the largest |v| the
  row attends to (``verify``); 16 ulp for float32, 4 ulp for the half types.
- ``lse``: |lse - ref| / (1 + |ref|); lse is float32 whatever the dtype.
- ``kernel``: a kernel's agreement with the float32 reference when it is
  probed (``kernels.attention.select_kernel``).
- ``sampled``: the relative error of sampled rows ``cqsa demo`` accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from cqsa_dask.core.errors import InvalidInputError

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "MAX_HEAD_DIM", "TOLERANCES", "DType", "Tolerance", "parse_dtype", "torch_dtype"]

DType = Literal["float32", "float16", "bfloat16"]
#: Bytes per element of each dtype a job may use.
DTYPES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
#: Largest head dim D the kernels support.
MAX_HEAD_DIM = 256
_ALIASES = {
    "fp32": "float32", "float": "float32", "f32": "float32",
    "fp16": "float16", "half": "float16", "f16": "float16",
    "bf16": "bfloat16",
}


@dataclass(frozen=True)
class Tolerance:
    """What a result in one dtype may differ from float64 (see the module docstring)."""

    out: float
    lse: float
    kernel: float
    sampled: float


TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(out=16 * 2.0**-23, lse=1e-6, kernel=1e-4, sampled=1e-4),
    "float16": Tolerance(out=4 * 2.0**-10, lse=2e-4, kernel=2e-2, sampled=3e-2),
    "bfloat16": Tolerance(out=4 * 2.0**-7, lse=2e-4, kernel=2e-2, sampled=3e-2),
}


def parse_dtype(dtype: object) -> DType:
    """Canonical dtype name from 'float32', 'fp16', 'bf16', 'torch.bfloat16', a torch dtype, ..."""
    name = str(dtype).lower().removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in DTYPES:
        raise InvalidInputError(
            f"dtype {dtype!r} is not supported: use float32, float16 or bfloat16 "
            "(short forms fp32, fp16, bf16)"
        )
    return name  # type: ignore[return-value]


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name (imports torch)."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[parse_dtype(name)]
