"""What the Triton kernel tests share: where they run, tolerances, output poisoning.

Importing this skips the importing test module without CUDA (unless ``TRITON_INTERPRET=1``:
then the checks run on the CPU through Triton's interpreter) or without Triton.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)

DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# relative L2 error allowed: float32 kernels use IEEE dots; bf16 differs by rounding order
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.5e-2}


def needs_gpu_numerics(dtype: torch.dtype = torch.float32, libdevice: bool = False) -> None:
    """Skip checks the interpreter cannot make: it truncates float32 -> bf16 casts (the GPU
    rounds to nearest even, as the reference does) and has no libdevice functions."""
    if INTERPRET and (libdevice or dtype == torch.bfloat16):
        pytest.skip("needs GPU numerics (interpreter: truncating bf16 casts, no libdevice)")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in output: an element was not written"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def poison_allocator(nbytes: int = 64 << 20) -> None:
    """Fill and free a large block so the caching allocator hands NaN-filled memory to the next
    ``torch.empty`` calls (the kernels' outputs)."""
    if DEVICE == "cuda":
        torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).fill_(float("nan"))


def compiled_variants(kernel) -> int:
    """How many variants of a ``@triton.jit`` kernel Triton has compiled in this process (a
    compile in the middle of serving stalls every stream: the tests check what triggers one)."""
    caches = getattr(kernel, "device_caches", None)
    if caches is None:
        pytest.skip("this Triton keeps its compiled kernels elsewhere")
    return sum(len(cache[0]) for cache in caches.values())

