"""Per-model memory terms that are not exact shapes: activation peak, CUDA graphs, device overhead.

Weights and KV bytes per token are exact (``ArchConfig``); the terms here are upper bounds whose
constants were measured (``bench/gpu_memory_check.py``, docs/benchmarks.md "Memory: planned vs
measured"): on an NVIDIA H200, driver 580.159.04, torch 2.11.0+cu130, the three-model example,
2026-11-27. ``modelhive ps`` shows them next to what the loaded process measures.
"""

from __future__ import annotations

import os

from modelhive.models.arch import DTYPE_BYTES, ArchConfig

MiB = 2**20
GiB = 2**30

#: device memory of one CUDA process outside the weights, KV pool, activation peak and graphs:
#: CUDA context (612 MiB by NVML after the first tensor), libraries and Triton modules loaded by
#: the first steps (66 MiB), cuBLAS workspace (32 MiB), and allocator cache beyond the one
#: activation peak (freed blocks of other sizes, other models' steps: 330 MiB of cache for a
#: 178 MiB peak). Measured on H200, after every model's worst step and traffic: 863 MiB, then
#: 961 MiB in a later run (2026-11-27, bench/gpu_memory_check.py, with the short-prompt graph
#: replays of runner/model_runner.py): planned with ~3 % headroom over the larger reading.
CUDA_OVERHEAD_BYTES = 992 * MiB
#: the split-K workspace of the swap-AB linears (``kernels/triton/skinny_gemm.py``: float32
#: partial tiles and one int32 counter per tile; one per device, shared by every model), added
#: on top of the measured overhead above (which predates it)
SPLIT_K_PARTIAL_BYTES = 2 * MiB
SPLIT_K_WORKSPACE_TILES = 4096
SPLIT_K_WORKSPACE_BYTES = SPLIT_K_PARTIAL_BYTES + 4 * SPLIT_K_WORKSPACE_TILES
#: per captured decode graph: graph executable and decode kernels loaded for capture (non-torch,
#: 94 MiB for 18 graphs), the capture stream's cuBLAS workspace and the pool's segment rounding.
#: Fitted on H200 (above): graph pool 92 MiB + non-torch 94 MiB for 18 captures of three models.
GRAPH_BYTES_PER_CAPTURE = 4 * MiB
#: greedy decode steps per multi-step decode graph (``runner/cuda_graphs.py``; 1: none). Each
#: decode bucket gets one more graph of this many forwards, planned as one more capture: with
#: them the three-model example measured 170 MiB non-torch for 56 captures (H200, 2026-11-28)
DECODE_STEPS = 4
#: staging buffers, attention metadata and allocator rounding of one step (measured: 0.1 to
#: 1.1 MiB above the largest phase at 2,048 tokens)
ACTIVATION_SLACK_BYTES = 2 * MiB
#: decode attention splits keys into partitions of at least this many tokens above SPLIT_ABOVE
#: (kernels/triton/paged_attention.py: 512, or SHORT_PARTITION = 256 for mid-size grids), each
#: with a float32 partial result; the shorter one bounds the partials from above
DECODE_PARTITION_TOKENS = 256
DECODE_SPLIT_ABOVE_TOKENS = 1024
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
    sampler: bool = True,
) -> int:
    """Peak, in bytes, of the transient tensors of one step of ``num_tokens`` tokens
    (``sampler`` False: a step that only computes its logits, as a CUDA graph does: 4 S V
    instead of ``sampler_bytes``).

    With e = dtype bytes, T = ``num_tokens`` (the token budget), S = ``max_num_seqs``,
    L = ``max_model_len``, h = hidden, q = heads x head_dim, kv = kv_heads x head_dim,
    I = intermediate, V = vocab, H = heads, D = head_dim. Layers run one after another, and inside
    a layer the attention part and the MLP part do not overlap, so the peak is the largest phase::

        residual  = 4 T h e                 the layer's inputs (hidden and residual, still held
                                            by the caller), the residual after attention, one
                                            normed copy (the add is fused into the norm, 08acb12)
        mlp       = residual + 3 T I e      fused gate_up [T, 2I] and act(gate) * up [T, I]
        attention = residual + T (q + 2kv) e + T (q + kv) e + T q e + scratch
                                            fused qkv, RoPE'd q and k, attention output
          scratch (CUDA) = S H ceil(L / 256) (D + 2) 4 when L > 1024: split-K partials of decodes
          scratch (CPU)  = max(2 L q e + 2 H min(T, L) L 4, 2 S L q e + 2 S H L 4): the reference
                           attention gathers K, V per sequence; fp32 scores and softmax
        logits    = 2 T h e + S h e + sampler_bytes(S, V)
                                            final norm, the S sampled rows, the sampler's peak
                                            (fp32 logits included)
        activation = max(mlp, attention, logits) + ACTIVATION_SLACK_BYTES

    On the CPU the sampler's peak is added to the largest phase instead of counted inside
    ``logits``: the peak there is the process's RSS, the heap keeps the pages the forward freed,
    and the sampler's large buffers come as fresh mappings (SmolLM2-135M, 16 rows, T = 512:
    the dry step peaked at 52.0 MiB with the sampler's costliest path, 35.2 with a plain draw).

    Measured on CUDA (H200, float16, T = 2048) before the residual add was fused into the norm
    (three T h e tensors then, not four): TinyLlama 90.1 MiB, Qwen2.5-3B 153.1-154.1 MiB, Yi-6B
    177.1-178.1 MiB, 0.1-1.1 MiB above that ``mlp`` phase, in two runs. The fourth T h e follows
    from the fused code (``LlamaModel.forward`` keeps both inputs of the running layer) and is not
    measured yet.
    """
    e = DTYPE_BYTES[dtype]
    t, s, seq_len = num_tokens, max_num_seqs, max_model_len
    h, q, kv, inter = arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size
    residual = 4 * t * h * e
    mlp = residual + 3 * t * inter * e
    if device == "cpu":
        chunk = min(t, seq_len)
        prefill = 2 * seq_len * q * e + 2 * arch.num_heads * chunk * seq_len * 4
        decode = 2 * s * seq_len * q * e + 2 * s * arch.num_heads * seq_len * 4
        scratch = max(prefill, decode)
    elif seq_len > DECODE_SPLIT_ABOVE_TOKENS:
        splits = -(-seq_len // DECODE_PARTITION_TOKENS)
        scratch = min(s, t) * arch.num_heads * splits * (arch.head_dim + 2) * 4
    else:
        scratch = 0
    attention = residual + t * (q + 2 * kv) * e + t * (q + kv) * e + t * q * e + scratch
    if sampler:
        kernel = device == "cuda" and SAMPLER_KERNEL
        sampler = sampler_bytes(s, arch.vocab_size, kernel=kernel,
                                logits_bytes=e) + penalty_bytes(s, seq_len, kernel)
    else:
        sampler = 4 * s * arch.vocab_size
    logits = 2 * t * h * e + s * h * e
    if device == "cpu":  # the RSS peak: the sampler's buffers land on top (docstring)
        return max(mlp, attention, logits) + sampler + ACTIVATION_SLACK_BYTES
    return max(mlp, attention, logits + sampler) + ACTIVATION_SLACK_BYTES


#: ``ModelSpec.max_num_seqs`` when a spec leaves it out: vLLM's server default on CUDA (its
#: decode graphs then cover 256 rows: ``graph_batch_sizes``); on the CPU, where a step's time
#: grows with its rows, 64
DEFAULT_MAX_NUM_SEQS = {"cuda": 256, "cpu": 64}

#: rows of logits the sampler's top-p stage sorts at a time (``engine/sampler.py``): the sort
#: holds ~44 bytes per (row, token) of those rows. On an H200, top-p over 256 rows of a 152k
#: vocabulary took 6.7 / 5.2 / 5.8 / 4.3 ms sorting 32 / 64 / 128 / 256 rows at a time.
SAMPLER_SORT_ROWS = 64


#: on CUDA the sampler draws a step of this many rows or more with its Triton kernel
#: (``kernels/triton/sampling.py``), fewer with torch ops (``engine/sampler.py``)
SAMPLER_KERNEL_MIN_ROWS = 8
#: ``MODELHIVE_SAMPLER_KERNEL=0``: the torch path on every step (the kernel's reference)
SAMPLER_KERNEL = os.environ.get("MODELHIVE_SAMPLER_KERNEL", "1") != "0"


def sampler_bytes(rows: int, vocab: int, kernel: bool = False, logits_bytes: int = 4) -> int:
    """The sampler's peak for ``rows`` rows of a ``vocab``-wide vocabulary (``engine/sampler.py``).

    The torch path: the logits (at most 4 B an entry), the penalties' float32 copy, the draw's
    own and a float32 tensor more (16 B an entry; the raw log-softmax of logprobs comes after
    the two copies are gone); then the larger of the top-p stage on ``SAMPLER_SORT_ROWS`` rows at
    a time (the sort's values, int64 order and the radix sort's buffers, then probabilities,
    cumulative sums, their difference and two byte masks: 44 B an entry) and the min-p stage on
    all rows (probabilities and a mask: 5 B an entry). Measured on an H200 (``tests/gpu``, bf16
    logits held by the caller, penalties + top-p + min-p + logprobs): 25.1 B an entry at 200
    rows of a 152k vocabulary, 52.2 at 24 rows (this gives 30.1 and 60).

    ``kernel`` (CUDA): steps of ``SAMPLER_KERNEL_MIN_ROWS`` rows or more draw in the Triton
    kernel, which needs no copy of its own (an 8 KiB scratch a row): the logits
    (``logits_bytes`` an entry: the model dtype's, from the cuBLAS LM head), then the
    penalties' float32 copy and their int32 counts (8 B an entry, measured on an H200 at 8-256
    rows: 8.00, when logprobs still took a float32 log-softmax with its float32 input; the
    logprobs kernel, ``kernels/triton/logprobs.py``, holds ~42 floats per 4,096 logits of a
    row); smaller steps take the torch path."""
    if kernel and rows >= SAMPLER_KERNEL_MIN_ROWS:
        return max(sampler_bytes(SAMPLER_KERNEL_MIN_ROWS - 1, vocab),
                   (logits_bytes + 8) * rows * vocab)
    return 16 * rows * vocab + max(44 * min(rows, SAMPLER_SORT_ROWS), 5 * rows) * vocab


#: the sampler's penalties take the rows' histories in groups of at most this many entries (a
#: longer history alone), so that their per-entry tensors stay bounded (``penalty_bytes``)
PENALTY_GROUP_ENTRIES = 2**18
#: device bytes a history entry holds at the penalties' peak (``engine/penalties._penalise``:
#: ids, row, per-entry table and penalties, flat index, values, counts key; measured on an H200
#: with repetition + frequency + presence penalties: 129-133, with pending tokens)
PENALTY_ENTRY_BYTES = 144
#: the same for the Triton kernel (``kernels/triton/penalties.py``), which holds only the ids
#: (int64) per entry: its groups take this many entries (32 MiB of ids)
PENALTY_KERNEL_GROUP_ENTRIES = 2**22
PENALTY_KERNEL_ENTRY_BYTES = 8


def penalty_group_entries(kernel: bool) -> int:
    """History entries in one group of the penalties (``engine/penalties.penalised``)."""
    return PENALTY_KERNEL_GROUP_ENTRIES if kernel else PENALTY_GROUP_ENTRIES


def penalty_bytes(max_num_seqs: int, max_model_len: int, kernel: bool = False) -> int:
    """The penalties' per-entry tensors at their peak: one group of at most
    ``penalty_group_entries(kernel)`` history entries, or one longer history (at most
    ``max_model_len``), and never more than every row's whole history. ``kernel``: on CUDA,
    the Triton kernel; its ``[programs, vocab]`` int32 counts are within the draw's 8 B an
    entry (``sampler_bytes``), the torch path's dense counts were measured in it too."""
    entries = min(max_num_seqs * max_model_len,
                  max(penalty_group_entries(kernel), max_model_len))
    return (PENALTY_KERNEL_ENTRY_BYTES if kernel else PENALTY_ENTRY_BYTES) * entries


#: captured graphs take steps of up to this many tokens even when ``max_num_seqs`` is smaller, so
#: short prompts ("Hello") run as one replay (one graph row per token; ``runner/cuda_graphs.py``)
MIN_GRAPH_ROWS = 16


def graph_max_rows(max_num_seqs: int) -> int:
    """Rows (tokens) of the largest captured graph."""
    return max(max_num_seqs, MIN_GRAPH_ROWS)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Row counts captured as CUDA graphs: 1, 2, 4, multiples of 8, ``graph_max_rows``."""
    rows = graph_max_rows(max_num_seqs)
    sizes = {1, 2, 4}
    sizes.update(range(8, rows + 1, 8))
    sizes.add(rows)
    return sorted(sizes)


def prefill_graph_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """Token counts captured as prefill graphs (``runner/prefill_graphs.py``): steps of more
    tokens than the largest decode graph take the smallest of these that holds them. Doubling
    from twice ``graph_max_rows`` up to ``max_num_batched_tokens`` rounded up to a multiple of
    16; none if that is within the decode graphs. (Sizes x1.5 apart took 11 captures and 7-13 s
    per model of the three-model example on H200, with their eager warm-ups.)"""
    rows = graph_max_rows(max_num_seqs)
    top = -(-max_num_batched_tokens // 16) * 16
    if top <= rows:
        return []
    sizes, size = [], 2 * rows
    while size < top:
        sizes.append(size)
        size *= 2
    return [*sizes, top]


def graph_bytes(
    arch: ArchConfig,
    dtype: str,
    *,
    max_num_seqs: int,
    max_model_len: int,
    device: str,
    enforce_eager: bool,
    max_num_batched_tokens: int = 0,
    decode_steps: int = DECODE_STEPS,
) -> int:
    """One model's CUDA-graph memory: 0 on CPU or with ``enforce_eager``.

    The decode buckets write their logits into one buffer per dtype (``runner/cuda_graphs.py``):
    4 V (max b + 2) covers the model-dtype rows of the largest bucket and the float32 rows of
    the GEMV's (the argmax's partials and the int64 greedy tokens, also outside the pool, fit in
    what this over-counts for the bf16 logits); each prefill graph keeps its sampled rows' hidden
    states ``[S, h]``; the largest capture's transients (``activation_bytes`` without the
    sampler at the largest prefill size, else T = S = ``graph_max_rows``; all models share one
    graph pool, so the sum over models bounds it from above); ``GRAPH_BYTES_PER_CAPTURE`` per
    captured size.
    With ``decode_steps`` S > 1, each decode bucket's S-step graph is one more capture, plus its
    int64 tokens ``[S, b]`` outside the pool; its transients are one forward's at a time
    (within the transient term). Measured with them (three-model example, H200): 414 MiB
    (graph pool 244, non-torch 170) for 56 captures, planned 734 MiB.
    The prefill graphs' transients sit in the pool for good, so with them the eager activation
    peak (``activation_bytes``, still reserved for the capture's warm-up and for sampling) is
    planned twice: an upper bound.
    Measured on H200 (module docstring), decode graphs only: 186 MiB for the three-model example
    (graph pool 92 MiB, non-torch growth 94 MiB), planned 194 MiB.
    """
    if device != "cuda" or enforce_eager:
        return 0
    sizes = graph_batch_sizes(max_num_seqs)
    prefill = prefill_graph_sizes(max_num_seqs, max_num_batched_tokens)
    outputs = 4 * arch.vocab_size * (sizes[-1] + 2)
    outputs += len(prefill) * max_num_seqs * arch.hidden_size * DTYPE_BYTES[dtype]
    tokens = max([graph_max_rows(max_num_seqs), *prefill])
    transient = activation_bytes(
        arch,
        dtype,
        num_tokens=tokens,
        max_num_seqs=graph_max_rows(max_num_seqs),
        max_model_len=max_model_len,
        device=device,
        sampler=False,
    )
    captures = len(sizes) + len(prefill)
    if decode_steps > 1:
        captures += len(sizes)
        outputs += 8 * decode_steps * sizes[-1]
    return outputs + transient + GRAPH_BYTES_PER_CAPTURE * captures


def packed_head_bytes(arch: ArchConfig, dtype: str, device: str) -> int:
    """CPU, bfloat16/float16, tied embeddings: the LM head's oneDNN-packed copy of the embedding
    table (``models/layers.py: pack_linears_for_cpu``; the lookup needs the plain table, so both
    stay resident). Counted with the weights; 0 otherwise, and on a CPU whose oneDNN cannot pack
    the dtype (``kernels/reference.py: cpu_packs``)."""
    if device != "cpu" or dtype not in ("bfloat16", "float16") or not arch.tie_word_embeddings:
        return 0
    import torch

    from modelhive.kernels.reference import cpu_packs  # here: it imports the runner's metadata

    if not cpu_packs(getattr(torch, dtype)):
        return 0
    return arch.vocab_size * arch.hidden_size * DTYPE_BYTES[dtype]


def overhead_bytes(device: str) -> int:
    """Device memory outside the other terms: 0 on CPU; on CUDA ``CUDA_OVERHEAD_BYTES`` and the
    split-K workspace of the few-rows linears."""
    return CUDA_OVERHEAD_BYTES + SPLIT_K_WORKSPACE_BYTES if device == "cuda" else 0
