"""Dispatch: the op a model calls, picked by the tensor's device.

The CPU path (and any device without a Triton kernel) uses ``reference.py``. Triton kernels are
registered here by ``kernels/triton`` when CUDA and Triton are available.
"""

from __future__ import annotations

from modelhive.kernels import reference

store_kv = reference.store_kv
paged_attention = reference.paged_attention
rms_norm = reference.rms_norm
apply_rope = reference.apply_rope
silu_and_mul = reference.silu_and_mul
gelu_tanh_and_mul = reference.gelu_tanh_and_mul
