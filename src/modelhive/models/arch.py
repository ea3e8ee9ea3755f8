"""ArchConfig: the shape of one model architecture, independent of where the weights come from.

Everything that sizes memory (weights, KV bytes per token) and everything that builds a model reads
this one frozen object. It is produced from an HF ``config.json`` dict (``from_hf_config``), from a
GGUF header (``models/gguf.py``) or from a preset (``models/presets.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from modelhive.errors import ConfigError

#: HF ``model_type`` -> our architecture family name (one model file each).
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

#: transformers' ``Gemma3TextConfig`` defaults for the keys a multimodal Gemma3 ``text_config``
#: may leave out (e.g. gemma-3-4b lists no head_dim, vocab_size or query_pre_attn_scalar).
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1,
}
GEMMA3_GLOBAL_THETA, GEMMA3_LOCAL_THETA = 1_000_000.0, 10_000.0


@dataclass(frozen=True)
class ArchConfig:
    """Shapes and hyper-parameters of a decoder-only transformer.

    ``arch`` is one of ``llama``, ``qwen2``, ``qwen3``, ``gemma3``. ``layer_types`` has one entry per
    layer, ``"full_attention"`` or ``"sliding_attention"`` (only Gemma3 uses the latter).
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    #: HF ``rope_scaling`` dict as sorted (key, value) pairs, or () for plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qkv bias (Qwen2)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3, Gemma3)
    hidden_act: str = "silu"  # silu | gelu_pytorch_tanh
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    # Gemma3 specifics
    rope_local_base_freq: float | None = None  # RoPE theta of sliding layers
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5
    embedding_multiplier: float = 1.0  # Gemma scales embeddings by sqrt(hidden)
    norm_offset: float = 0.0  # Gemma RMSNorm uses (1 + weight)
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    #: the dtype the checkpoint was written in (used when a spec asks for dtype "auto")
    torch_dtype: str = "float32"
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_layers is {self.num_layers}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("model config: num_heads must be a multiple of num_kv_heads")

    # ----------------------------------------------------------------------------------- sizes
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: str) -> int:
        """Bytes of K and V one token occupies across all layers: 2 x layers x kv_heads x head_dim x dtype."""
        return 2 * self.num_layers * self.kv_size * DTYPE_BYTES[dtype]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter of the model by its HF checkpoint name, with its shape.

        This is the single source of truth for parameter counts and weight bytes; it lists what
        ``transformers`` counts (tied embeddings counted once).
        """
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, self.hidden_size)}
        h, inter = self.hidden_size, self.intermediate_size
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes[p + "self_attn.q_proj.weight"] = (self.q_size, h)
            shapes[p + "self_attn.k_proj.weight"] = (self.kv_size, h)
            shapes[p + "self_attn.v_proj.weight"] = (self.kv_size, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, self.q_size)
            if self.attention_bias:
                shapes[p + "self_attn.q_proj.bias"] = (self.q_size,)
                shapes[p + "self_attn.k_proj.bias"] = (self.kv_size,)
                shapes[p + "self_attn.v_proj.bias"] = (self.kv_size,)
            if self.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (self.head_dim,)
                shapes[p + "self_attn.k_norm.weight"] = (self.head_dim,)
            shapes[p + "mlp.gate_proj.weight"] = (inter, h)
            shapes[p + "mlp.up_proj.weight"] = (inter, h)
            shapes[p + "mlp.down_proj.weight"] = (h, inter)
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            if self.arch == "gemma3":
                shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
                shapes[p + "post_feedforward_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    def num_params(self) -> int:
        total = 0
        for shape in self.param_shapes().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def weight_bytes(self, dtype: str) -> int:
        return self.num_params() * DTYPE_BYTES[dtype]

    def replace(self, **changes: Any) -> ArchConfig:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------- from HF
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ArchConfig:
        """Build from a transformers ``config.json`` dict (Gemma3 multimodal configs: the text part)."""
        if cfg.get("model_type") == "gemma3" and "text_config" in cfg:
            cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
        model_type = cfg.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ConfigError(
                f"unsupported architecture model_type={model_type!r}; supported: "
                + ", ".join(sorted(HF_MODEL_TYPES))
            )
        arch = HF_MODEL_TYPES[model_type]
        if arch == "gemma3":
            # multimodal Gemma3 configs list only the text keys that differ from the defaults
            cfg = {**GEMMA3_TEXT_DEFAULTS, **cfg}
            if cfg.get("use_bidirectional_attention"):
                raise ConfigError("Gemma3 with use_bidirectional_attention (an embedding model) is "
                                  "not a causal LM and is not supported")
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        num_layers = cfg["num_hidden_layers"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if cfg.get("attention_bias") and arch != "qwen2":
            # Llama/Qwen3/Gemma3 put this bias on o_proj too; our models carry a q/k/v bias only
            raise ConfigError(f"{model_type} with attention_bias=true is not supported")
        if cfg.get("mlp_bias"):
            raise ConfigError(f"{model_type} with mlp_bias=true is not supported")
        if arch in ("qwen2", "qwen3") and cfg.get("use_sliding_window") and cfg.get("sliding_window"):
            # transformers: layers from max_window_layers on slide (unless layer_types says)
            first_sliding = cfg.get("max_window_layers", 28)
            qwen_types = cfg.get("layer_types") or [
                "sliding_attention" if i >= first_sliding else "full_attention"
                for i in range(num_layers)]
            if "sliding_attention" in qwen_types:
                raise ConfigError(f"{model_type} with use_sliding_window=true is not supported; "
                                  "set use_sliding_window: false")
        rope_scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta")
        local_theta = cfg.get("rope_local_base_freq")
        rope_params = cfg.get("rope_parameters")  # transformers >= 5 folds theta in here
        if isinstance(rope_params, dict):
            # when both are present, rope_parameters is what transformers uses
            if "full_attention" in rope_params:  # gemma3: per layer type
                full = rope_params.get("full_attention") or {}
                local = rope_params.get("sliding_attention") or {}
                rope_theta = full.get("rope_theta", rope_theta)
                local_theta = local.get("rope_theta", local_theta)
            else:
                full = rope_params
                rope_theta = rope_params.get("rope_theta", rope_theta)
            if full.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in full.items() if k != "rope_theta"}
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        if arch == "gemma3":
            rope_theta = rope_theta or GEMMA3_GLOBAL_THETA
            cfg = {**cfg, "rope_local_base_freq": local_theta or GEMMA3_LOCAL_THETA}
        layer_types = tuple(cfg.get("layer_types") or ())
        sliding_window = cfg.get("sliding_window")
        if arch == "gemma3":
            if not layer_types:
                pattern = cfg.get("sliding_window_pattern", 6)
                layer_types = tuple(
                    "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                    for i in range(num_layers)
                )
        else:
            # Llama/Mistral/Qwen: a sliding window that applies to every layer is not supported;
            # Qwen2 configs carry sliding_window but use_sliding_window=False.
            if arch == "llama" and sliding_window is not None and model_type == "mistral":
                raise ConfigError("Mistral with sliding_window is not supported; set sliding_window: null")
            sliding_window = None
            layer_types = ()
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        return cls(
            arch=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else (),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", arch == "gemma3")),
            attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
            qk_norm=arch in ("qwen3", "gemma3"),
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu",
            layer_types=layer_types,
            sliding_window=sliding_window if arch == "gemma3" else None,
            rope_local_base_freq=cfg.get("rope_local_base_freq") if arch == "gemma3" else None,
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if arch == "gemma3" else None,
            embedding_multiplier=float(cfg["hidden_size"]) ** 0.5 if arch == "gemma3" else 1.0,
            norm_offset=1.0 if arch == "gemma3" else 0.0,
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(dtype),
        )
