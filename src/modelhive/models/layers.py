"""Building blocks shared by the architecture files: fused linears that load themselves, RMSNorm,
rotary embedding, the paged attention layer, the gated MLP, and the checkpoint loading loop.

Every op goes through ``kernels.ops`` so the GPU path can swap in its kernels. Parameters are
created directly in the model dtype on the current device (``torch.device`` context of the
model constructor); RoPE frequencies stay float32.

Weight loading follows nano-vllm: a parameter may carry a ``weight_loader(param, tensor, shard)``
and a tuple ``shard_ids`` naming the checkpoint tensors packed into it (q, k, v -> ``qkv_proj``;
gate (0), up (1) -> ``gate_up_proj``). ``load_checkpoint`` is the one loop that maps HF names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelhive.errors import ConfigError
from modelhive.kernels import ops, reference
from modelhive.models.arch import ArchConfig
from modelhive.models.base import CausalLM, KVCaches
from modelhive.runner.attn_metadata import AttentionMetadata


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit a "
                         f"parameter of shape {tuple(param.shape)}")
    param.data.copy_(loaded)


def _copy_rows(param: nn.Parameter, loaded: torch.Tensor, start: int, size: int) -> None:
    """Copy ``loaded`` into rows ``[start, start + size)`` (dim 0) of a fused parameter."""
    if loaded.shape[0] != size or loaded.shape[1:] != param.shape[1:]:
        raise ValueError(f"checkpoint shard of shape {tuple(loaded.shape)} does not fit "
                         f"{size} rows of a parameter of shape {tuple(param.shape)}")
    param.data[start:start + size].copy_(loaded)


class Linear(nn.Module):
    """``y = x @ W.T (+ b)``, W ``[out, in]`` like ``nn.Linear``, loaded as one tensor."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.linear(x, self.weight, self.bias)  # F.linear, or the CPU-packed weight


class MergedLinear(Linear):
    """Several checkpoint linears sharing one input, stacked on the output dim (gate, up).

    ``shard_ids`` name the checkpoint tensors in order (default 0, 1, ...); ``sizes`` are their
    output widths, so ``forward(x).split(self.sizes, -1)`` gives them back.
    """

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, dtype: torch.dtype,
                 shard_ids: tuple | None = None):
        super().__init__(in_features, sum(out_sizes), bias, dtype)
        self.sizes = list(out_sizes)
        ids = shard_ids or tuple(range(len(out_sizes)))
        starts = [sum(out_sizes[:i]) for i in range(len(out_sizes))]
        self.shards = dict(zip(ids, zip(starts, out_sizes, strict=True), strict=True))
        for param in self.parameters():
            param.weight_loader = self.weight_loader
            param.shard_ids = ids

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: Any) -> None:
        _copy_rows(param, loaded, *self.shards[shard])


class QKVLinear(MergedLinear):
    """q, k and v projections as one ``[q_size + 2 * kv_size, hidden]`` weight (shards "q","k","v")."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 bias: bool, dtype: torch.dtype):
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden_size, [q_size, kv_size, kv_size], bias, dtype, ("q", "k", "v"))


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype),
                                   requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class RMSNorm(nn.Module):
    """``x / rms(x) * (offset + w)`` over the last dim; Gemma uses ``offset=1``."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.offset)

    def then(self, linear: Linear, x: torch.Tensor) -> torch.Tensor:
        """``linear(norm(x))`` as one op (on the GPU, small batches normalise inside the GEMM)."""
        return ops.norm_linear(x, self.weight, self.eps, self.offset, linear.weight, linear.bias)

    def then_act(self, gate_up: Linear, act: str, x: torch.Tensor) -> torch.Tensor:
        """``act_and_mul(gate_up(norm(x)))`` as one op (on the GPU, small batches apply the
        gated activation in the GEMV's epilogue)."""
        return ops.norm_linear_act(x, self.weight, self.eps, self.offset, gate_up.weight, act)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """RoPE inverse frequencies ``[head_dim / 2]`` float32, as transformers computes them.

    ``scaling`` is the HF rope_scaling dict (``rope_type``: default, linear or llama3). Dynamic NTK,
    YaRN and LongRoPE change frequencies with the sequence length and are not supported.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    raise ConfigError(f"RoPE scaling type {rope_type!r} is not supported; supported: default, "
                      "linear, llama3")


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE applied to q and k ``[N, heads, head_dim]`` at ``positions [N]``."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)
        self._cached: tuple | None = None  # (positions, dtype, cos_sin, tables) of this step

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if q.is_cuda:  # the Triton kernel computes cos/sin inline
            return (ops.apply_rope(q, positions, self.inv_freq),
                    ops.apply_rope(k, positions, self.inv_freq))
        cos, sin = self._cos_sin(positions, q.dtype)
        return reference.rotate_half_rope(q, cos, sin), reference.rotate_half_rope(k, cos, sin)

    def rotate_and_store(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         kv_cache: tuple[torch.Tensor, torch.Tensor],
                         meta: AttentionMetadata) -> torch.Tensor:
        """RoPE on q and k, rotated k and v written to this layer's pool views, in one op;
        returns the rotated q (on the GPU: ``q`` itself, rotated in place)."""
        k_cache, v_cache = kv_cache
        if q.is_cuda:
            return ops.rope_store_kv(q, k, v, meta.positions, self.inv_freq, k_cache, v_cache, meta)
        return reference.rope_store_kv(q, k, v, meta.positions, self.inv_freq, k_cache, v_cache,
                                       meta, tables=self._tables(meta.positions, q.dtype))

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos/sin once per step for all layers (every layer gets the same positions tensor)."""
        return self._step_cache(positions, dtype)[0]

    def _tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """``reference.rope_tables`` once per step for all layers."""
        return self._step_cache(positions, dtype)[1]

    def _step_cache(self, positions: torch.Tensor, dtype: torch.dtype):
        if self._cached is None or self._cached[0] is not positions or self._cached[1] != dtype:
            cos_sin = reference.rope_cos_sin(positions, self.inv_freq, dtype)
            self._cached = (positions, dtype, cos_sin, reference.rope_tables(*cos_sin))
        return self._cached[2:]


class PagedAttention(nn.Module):
    """Writes this step's K/V into the pool, then attends over the cached context.

    ``q`` ``[N, heads, D]``, ``k``/``v`` ``[N, kv_heads, D]``; ``kv_cache`` is this layer's
    ``(k_view, v_view)`` of the pool. Returns ``[N, heads, D]``.
    """

    def __init__(self, scale: float, sliding_window: int | None = None,
                 softcap: float | None = None):
        super().__init__()
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        ops.store_kv(kv_cache[0], kv_cache[1], k, v, meta)
        return self.attend(q, kv_cache, meta)

    def attend(self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
               meta: AttentionMetadata) -> torch.Tensor:
        """Attention only: this step's keys and values are already in the pool."""
        return ops.paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale,
                                   self.sliding_window, self.softcap)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": ops.silu_and_mul,
    "gelu_pytorch_tanh": ops.gelu_tanh_and_mul,
}
#: HF ``hidden_act`` -> the ``act`` name of the fused ``ops.norm_linear_act``
ACT_NAMES = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused into ``gate_up_proj``."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str,
                 dtype: torch.dtype):
        super().__init__()
        if hidden_act not in ACTIVATIONS:
            raise ConfigError(f"activation {hidden_act!r} is not supported; supported: "
                              + ", ".join(ACTIVATIONS))
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2, False, dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, False, dtype)
        self.act_and_mul = ACTIVATIONS[hidden_act]
        self.act = ACT_NAMES[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))

    def add_to(self, h: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """``h + mlp(norm(h))``: the norm and the gated activation fused into gate_up, the add
        into down."""
        return ops.linear_add(norm.then_act(self.gate_up_proj, self.act, h),
                              self.down_proj.weight, h)


def final_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``[M, hidden] -> [M, vocab]`` (float32, or the model dtype where ``ops.logits`` keeps
    it), with optional ``tanh`` soft-capping (in float32); into ``out`` if given (of the dtype
    this returns without it: a CUDA graph's static output)."""
    if softcap is None:
        return ops.logits(hidden, weight, out)
    logits = torch.tanh(ops.logits(hidden, weight).float() / softcap) * softcap
    return logits if out is None else out.copy_(logits)


#: checkpoint name fragment -> (our fused parameter fragment, shard id)
PACKED_MODULES = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


def load_checkpoint(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                    tie_word_embeddings: bool) -> set[str]:
    """Copy ``(hf_name, tensor)`` pairs into ``model``'s (fused) parameters.

    Returns the names of the parameters that are completely filled (a fused one only once all its
    shards arrived). A checkpoint name with no parameter is an error; ``lm_head.weight`` is
    skipped when embeddings are tied, as are stale ``rotary_emb.inv_freq`` buffers.
    """
    params = dict(model.named_parameters())
    shards_seen: dict[str, set] = {}
    for hf_name, tensor in weights:
        if "rotary_emb.inv_freq" in hf_name or (tie_word_embeddings and hf_name == "lm_head.weight"):
            continue
        name, shard = hf_name, None
        for fragment, (fused, shard_id) in PACKED_MODULES.items():
            if fragment in hf_name:
                name, shard = hf_name.replace(fragment, fused), shard_id
                break
        param = params.get(name)
        if param is None:
            raise ValueError(f"checkpoint tensor {hf_name!r} matches no parameter of "
                             f"{type(model).__name__}; is the architecture right?")
        if shard is None:
            default_weight_loader(param, tensor)
        else:
            param.weight_loader(param, tensor, shard)
        shards_seen.setdefault(name, set()).add(shard)
    return {name for name, seen in shards_seen.items()
            if seen == set(getattr(params[name], "shard_ids", (None,)))}


def pack_linears_for_cpu(model: nn.Module) -> int:
    """CPU serving: replace the weight of every bfloat16/float16 ``Linear`` (and a tied LM head)
    by its oneDNN-packed form (``reference.pack_linear_weight``); returns how many were packed.

    The packed weight stays a parameter of the same shape, dtype and byte count, so memory
    accounting is unchanged; it is opaque (no strided view), which only the CPU ops read. A tied
    head cannot share the embedding table (the lookup needs the plain rows), so it gets a packed
    copy (``packed_tied_head``: one more vocab x hidden matrix). On a CPU whose oneDNN cannot pack
    the dtype (``reference.cpu_packs``) nothing is packed.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, Linear) and not module.weight.is_mkldnn \
                and module.weight.device.type == "cpu" \
                and reference.cpu_packs(module.weight.dtype):
            module.weight = nn.Parameter(reference.pack_linear_weight(module.weight),
                                         requires_grad=False)
            count += 1
    if isinstance(model, DecoderLM) and model.lm_head is None:
        table = model.model.embed_tokens.weight
        if table.device.type == "cpu" and reference.cpu_packs(table.dtype):
            model.packed_tied_head = reference.pack_linear_weight(table)
            count += 1
    return count


class DecoderLM(CausalLM):
    """The causal-LM shell every architecture shares: ``model_cls`` (embeddings, layers, final
    norm) plus the LM head (tied to the embeddings when ``arch.tie_word_embeddings``)."""

    model_cls: type[nn.Module]

    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__()
        self.arch = arch
        with torch.device(device):
            self.model = self.model_cls(arch, dtype)
            self.lm_head = (None if arch.tie_word_embeddings
                            else Linear(arch.hidden_size, arch.vocab_size, False, dtype))

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                kv_caches: KVCaches) -> torch.Tensor:
        return self.model(input_ids, meta, kv_caches)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        weight = getattr(self, "packed_tied_head", None)
        return final_logits(hidden, head.weight if weight is None else weight,
                            self.arch.final_logit_softcapping, out)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_checkpoint(self, weights, self.arch.tie_word_embeddings)
