"""Triton kernels for CUDA tensors, one per op of ``kernels/reference.py`` with the same contract.

Import only where CUDA and Triton are available (``kernels/ops.py`` does it lazily). Every kernel
reads and writes the shared pool through the strided per-layer views ``[num_blocks, T, kv_heads,
head_dim]`` (block stride = block_bytes / element size, any T), and takes its shapes from tensor
shapes and static metadata only, so a decode step can be captured in a CUDA graph.
"""

from modelhive.kernels.triton.activation import gelu_tanh_and_mul, silu_and_mul
from modelhive.kernels.triton.argmax import argmax
from modelhive.kernels.triton.linears import linear_add, logits, norm_linear, norm_linear_act
from modelhive.kernels.triton.logprobs import logprobs
from modelhive.kernels.triton.paged_attention import paged_attention
from modelhive.kernels.triton.penalties import penalise
from modelhive.kernels.triton.rmsnorm import rms_norm
from modelhive.kernels.triton.rope import apply_rope, rope_store_kv
from modelhive.kernels.triton.sampling import draw
from modelhive.kernels.triton.store_kv import store_kv

__all__ = ["apply_rope", "argmax", "draw", "gelu_tanh_and_mul", "linear_add", "logits", "logprobs",
           "norm_linear", "norm_linear_act", "paged_attention", "penalise", "rms_norm",
           "rope_store_kv", "silu_and_mul", "store_kv"]
