"""Dispatch: the op a model calls, picked by the tensor's device.

CUDA tensors take the Triton kernels of ``kernels/triton`` (imported on first use); everything
else, and CUDA when Triton is missing, takes ``reference.py``. Both share one contract.
"""

from __future__ import annotations

from types import ModuleType

from modelhive.kernels import reference

_triton: ModuleType | None = None
_triton_tried = False


def _gpu(x) -> ModuleType | None:
    """The Triton kernel module for a CUDA tensor, else None."""
    global _triton, _triton_tried
    if not x.is_cuda:
        return None
    if not _triton_tried:
        _triton_tried = True
        try:
            from modelhive.kernels import triton as triton_kernels
        except ImportError:
            triton_kernels = None
        _triton = triton_kernels
    return _triton


def store_kv(k_cache, v_cache, k, v, meta):
    return (_gpu(k) or reference).store_kv(k_cache, v_cache, k, v, meta)


def paged_attention(q, k_cache, v_cache, meta, scale, sliding_window=None, softcap=None):
    return (_gpu(q) or reference).paged_attention(q, k_cache, v_cache, meta, scale,
                                                  sliding_window, softcap)


def rms_norm(x, weight, eps, offset=0.0):
    return (_gpu(x) or reference).rms_norm(x, weight, eps, offset)


def norm_linear(x, norm_weight, eps, offset, weight, bias=None):
    return (_gpu(x) or reference).norm_linear(x, norm_weight, eps, offset, weight, bias)


def norm_linear_act(x, norm_weight, eps, offset, weight, act):
    """``act_and_mul(norm_linear(x))`` with ``weight`` a fused gate_up ``[2I, K]``."""
    return (_gpu(x) or reference).norm_linear_act(x, norm_weight, eps, offset, weight, act)


def linear_add(x, weight, residual):
    """``residual + x @ weight.T``; ``residual`` may be overwritten with the result (the GPU
    does), so callers pass a residual stream they no longer need."""
    return (_gpu(x) or reference).linear_add(x, weight, residual)


def logits(x, weight, out=None):
    """``x @ weight.T`` rounded to ``x.dtype`` (as a linear in the model dtype is): as float32,
    except on CUDA above ``gemv.GEMV_MAX_ROWS`` rows, where it stays in ``x.dtype`` (the sampler
    upcasts what it draws from; ``engine/sampler.py``); into ``out`` (of that dtype) if given."""
    return (_gpu(x) or reference).logits(x, weight, out)


def argmax(logits, out=None):
    """Greedy tokens: int64 ``[rows]``, the first index of each row's maximum (into ``out``)."""
    return (_gpu(logits) or reference).argmax(logits, out)


def draw_kernel(logits):
    """The Triton draw of CUDA ``logits`` (``kernels/triton/sampling.draw``), else None: the
    sampler's torch path (``engine/sampler._draw``) is its reference and the CPU's draw."""
    gpu = _gpu(logits)
    return None if gpu is None else gpu.draw


def penalty_kernel(logits):
    """The Triton penalties for CUDA ``logits`` (``kernels/triton/penalties.penalise``), else
    None: ``engine/penalties._penalise`` is its reference and the CPU's path."""
    gpu = _gpu(logits)
    return None if gpu is None else gpu.penalise


def logprobs_kernel(logits):
    """The Triton logprobs of CUDA ``logits`` (``kernels/triton/logprobs.logprobs``), else None:
    ``engine/sampler._logprobs`` is its reference and the CPU's path."""
    gpu = _gpu(logits)
    return None if gpu is None else gpu.logprobs


def apply_rope(x, positions, inv_freq, attention_scaling=1.0):
    return (_gpu(x) or reference).apply_rope(x, positions, inv_freq, attention_scaling)


def rope_store_kv(q, k, v, positions, inv_freq, k_cache, v_cache, meta, attention_scaling=1.0):
    return (_gpu(q) or reference).rope_store_kv(q, k, v, positions, inv_freq, k_cache, v_cache,
                                                meta, attention_scaling)


def silu_and_mul(x):
    return (_gpu(x) or reference).silu_and_mul(x)


def gelu_tanh_and_mul(x):
    return (_gpu(x) or reference).gelu_tanh_and_mul(x)
