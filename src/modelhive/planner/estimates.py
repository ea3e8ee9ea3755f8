"""Per-model memory terms that are not exact shapes: activation peak, CUDA graphs, device overhead.

Weights and KV bytes per token are exact (``ArchConfig``); the terms here are documented upper
bounds, chosen so that a plan that fits on paper also fits when loaded. ``modelhive ps`` later
shows them next to the measured numbers.
"""

from __future__ import annotations

from modelhive.models.arch import DTYPE_BYTES, ArchConfig

MiB = 2**20
GiB = 2**30

#: CUDA context + non-torch allocations (cuBLAS workspaces, NCCL, allocator slack) of one process.
#: An estimate until measured per device kind (the vLLM setup measured 0.4-0.9 GB per process).
CUDA_OVERHEAD_BYTES = 512 * MiB
#: bookkeeping of one captured CUDA graph (kernel nodes, parameters); an estimate, measured later.
GRAPH_BYTES_PER_CAPTURE = 2 * MiB
#: on CPU with no budget given, the KV pool is capped here (see ``plan_memory``).
CPU_DEFAULT_KV_CAP_BYTES = 4 * GiB


def activation_bytes(
    arch: ArchConfig,
    dtype: str,
    *,
    num_tokens: int,
    max_num_seqs: int,
    max_model_len: int,
    device: str,
) -> int:
    """Upper bound, in bytes, of the transient tensors of one forward of ``num_tokens`` tokens.

    With e = dtype bytes, T = ``num_tokens`` (the token budget), S = ``max_num_seqs``,
    L = ``max_model_len``, h = hidden, q = heads x head_dim, kv = kv_heads x head_dim,
    I = intermediate, V = vocab, H = heads::

        hidden    = 4 T h e                      residual, hidden, normed input, layer output
        qkv       = T (q + 2kv) e + T (q + kv) e + T q e
                                                 fused qkv, RoPE'd q and k, attention output
        gate_up   = 2 T I e + T I e              fused gate_up and act(gate) * up
        scratch   = max(prefill, decode)         CPU reference attention only (0 on CUDA, where
                                                 the Triton kernels read the paged cache in place)
          prefill = 2 L q e + 2 H P L 4          one chunk of P = min(T, L) queries against L keys:
                                                 K, V gathered and expanded to all heads; fp32
                                                 scores and softmax
          decode  = 2 S L q e + 2 S H L 4        S sequences against L keys each
        logits    = 2 S V 4                      fp32 logits of S rows, x2 for the sampling copy
        activation = hidden + qkv + gate_up + scratch + logits

    Layers run one after another, so one layer's tensors bound all layers'. The terms are never
    all live at once, so their sum is an upper bound.
    """
    e = DTYPE_BYTES[dtype]
    t, s, seq_len = num_tokens, max_num_seqs, max_model_len
    h, q, kv, inter = arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size
    hidden = 4 * t * h * e
    qkv = t * (q + 2 * kv) * e + t * (q + kv) * e + t * q * e
    gate_up = 3 * t * inter * e
    scratch = 0
    if device == "cpu":
        chunk = min(t, seq_len)
        prefill = 2 * seq_len * q * e + 2 * arch.num_heads * chunk * seq_len * 4
        decode = 2 * s * seq_len * q * e + 2 * s * arch.num_heads * seq_len * 4
        scratch = max(prefill, decode)
    logits = 2 * s * arch.vocab_size * 4
    return hidden + qkv + gate_up + scratch + logits


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes captured as CUDA graphs: 1, 2, 4, multiples of 8, max_num_seqs."""
    sizes = {b for b in (1, 2, 4) if b <= max_num_seqs}
    sizes.update(range(8, max_num_seqs + 1, 8))
    sizes.add(max_num_seqs)
    return sorted(sizes)


def graph_bytes(
    arch: ArchConfig,
    dtype: str,
    *,
    max_num_seqs: int,
    max_model_len: int,
    device: str,
    enforce_eager: bool,
) -> int:
    """Estimate of one model's CUDA-graph memory: 0 on CPU or with ``enforce_eager``.

    Graphs of all batch sizes share one memory pool, sized by the largest capture: the decode
    activation of ``max_num_seqs`` tokens (``activation_bytes`` with T = S) plus
    ``GRAPH_BYTES_PER_CAPTURE`` per captured batch size. An estimate until measured.
    """
    if device != "cuda" or enforce_eager:
        return 0
    pool = activation_bytes(
        arch,
        dtype,
        num_tokens=max_num_seqs,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        device=device,
    )
    return pool + GRAPH_BYTES_PER_CAPTURE * len(graph_batch_sizes(max_num_seqs))


def overhead_bytes(device: str) -> int:
    """Device memory outside torch tensors: 0 on CPU, ``CUDA_OVERHEAD_BYTES`` on CUDA."""
    return CUDA_OVERHEAD_BYTES if device == "cuda" else 0
