"""GGUF files: header -> ArchConfig, tensors -> dequantized float32 with transformers' names.

The header parser is our own (about 60 lines): ``gguf.GGUFReader`` builds Python objects for every
array element and takes ~10 s on a 262k-token vocabulary, we read numeric arrays with numpy and
only decode the token strings (~0.3 s). Dequantization uses ``gguf.quants.dequantize``.

Tensors are converted exactly as transformers' GGUF loader does (``modeling_gguf_pytorch_utils``),
so our weights equal ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` bit for bit:
- arch ``llama``: llama.cpp permutes the rows of q and k for its RoPE layout; we undo it
  (``_unpermute_rows``, same reshape as transformers' ``_reverse_permute_weights``).
- arch ``gemma3``: llama.cpp stores every ``*norm.weight`` as 1 + w; HF's Gemma RMSNorm multiplies
  by (1 + w), so we subtract 1.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelhive.errors import ConfigError
from modelhive.models.arch import ArchConfig

SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
#: chat turn terminators added to eos_token_ids when the vocabulary has them (HF generation_config
#: lists them too, e.g. Gemma 3: [1, 106])
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
          11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy / HF order (GGUF stores dims reversed)
    ggml_type: int
    offset: int  # absolute byte offset in the file


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "?"))


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse metadata and tensor infos (no tensor data is read)."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ConfigError(f"{path} is not a GGUF file (bad magic); point source at a .gguf file",
                              key="source")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ConfigError(f"{path}: GGUF version {version} is not supported (2 or 3 are)",
                              key="source")
        pos = 24

        def read_string() -> str:
            nonlocal pos
            (length,) = struct.unpack_from("<Q", buf, pos)
            text = buf[pos + 8:pos + 8 + length].decode("utf-8", errors="replace")
            pos += 8 + length
            return text

        def read_value(value_type: int) -> Any:
            nonlocal pos
            if value_type == _STRING:
                return read_string()
            if value_type == _ARRAY:
                elem_type, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if elem_type in _NUMPY:
                    values = np.frombuffer(buf, dtype=_NUMPY[elem_type], count=count, offset=pos)
                    pos += values.nbytes
                    return values.tolist()
                return [read_value(elem_type) for _ in range(count)]
            fmt = _SCALARS[value_type]
            (value,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return value

        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = read_string()
            (value_type,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            metadata[key] = read_value(value_type)
        infos = []
        for _ in range(n_tensors):
            name = read_string()
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = (pos + alignment - 1) // alignment * alignment
    tensors = {name: GGUFTensorInfo(name, shape, ggml_type, data_start + offset)
               for name, shape, ggml_type, offset in infos}
    return GGUFHeader(Path(path), metadata, tensors)


def _round32(value: float) -> float:
    """GGUF stores floats as float32: 9.9999997e-06 -> 1e-05 (the config.json value)."""
    return float(f"{value:.7g}")


def gguf_arch_config(header: GGUFHeader) -> ArchConfig:
    """ArchConfig with the fields ``ArchConfig.from_hf_config`` gives for the original config.json."""
    arch = header.architecture
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ConfigError(f"{header.path.name}: GGUF architecture {arch!r} is not supported; use a "
                          f"model of one of: {', '.join(SUPPORTED_GGUF_ARCHS)}", key="source")
    md = header.metadata

    def get(key: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{key}", default)

    embed = header.tensors.get("token_embd.weight")
    if embed is None:
        raise ConfigError(f"{header.path.name} has no token_embd.weight tensor", key="source")
    hidden, num_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // num_heads
    num_layers = int(get("block_count"))
    cfg: dict[str, Any] = {
        "model_type": "gemma3_text" if arch == "gemma3" else arch,
        "vocab_size": embed.shape[0], "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")), "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", num_heads)),
        "head_dim": int(head_dim),
        "rms_norm_eps": _round32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _round32(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "attention_bias": "blk.0.attn_q.bias" in header.tensors,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "torch_dtype": "float16" if md.get("general.file_type") == 1 else "bfloat16",
    }
    scaling_type = get("rope.scaling.type")
    if scaling_type not in (None, "none"):
        cfg["rope_scaling"] = {"rope_type": scaling_type, "factor": get("rope.scaling.factor")}
    if arch == "gemma3":
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
        cfg["sliding_window"] = get("attention.sliding_window")
        pattern = get("attention.sliding_window_pattern")
        if isinstance(pattern, list):  # newer converters: one bool per layer, True = sliding
            cfg["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
        elif isinstance(pattern, int):  # every pattern-th layer is global
            cfg["sliding_window_pattern"] = pattern
        cfg["rope_local_base_freq"] = 10000.0  # llama.cpp's fixed value for Gemma 3 local layers
        # llama.cpp: scale 1/sqrt(hidden/heads) for the 27B (62 layers), else 1/sqrt(head_dim)
        cfg["query_pre_attn_scalar"] = hidden // num_heads if num_layers == 62 else head_dim
        cfg["final_logit_softcapping"] = get("final_logit_softcapping")
        cfg["attn_logit_softcapping"] = get("attn_logit_softcapping")
    tokens = md.get("tokenizer.ggml.tokens") or []
    eos = md.get("tokenizer.ggml.eos_token_id")
    eos_ids = [] if eos is None else [int(eos)]
    for text in END_OF_TURN_TOKENS:
        if text in tokens and tokens.index(text) not in eos_ids:
            eos_ids.append(tokens.index(text))
    cfg["eos_token_id"] = eos_ids
    return ArchConfig.from_hf_config(cfg)


_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_GEMMA3_LAYER_NAMES = {**_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm",
                       "post_attention_norm": "post_attention_layernorm",
                       "post_ffw_norm": "post_feedforward_layernorm"}
#: GGUF tensors with no HF parameter (llama3 rope factors are derived from config in HF)
_IGNORED = {"rope_freqs.weight"}


def hf_tensor_name(gguf_name: str, arch: str) -> str | None:
    """transformers' name for a GGUF tensor, or None if it has none."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    table = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    if match is None or match.group(2) not in table:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{table[part]}.{kind}"


def _unpermute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (transformers' ``_reverse_permute_weights``)."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def iter_gguf_tensors(header: GGUFHeader, arch: ArchConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, float32 array)`` for every tensor of the file, in file order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quant_shape_to_byte_shape

    file_arch = header.architecture
    data = np.memmap(header.path, dtype=np.uint8, mode="r")
    for info in header.tensors.values():
        if info.name in _IGNORED:
            continue
        hf_name = hf_tensor_name(info.name, file_arch)
        if hf_name is None:
            raise ConfigError(f"{header.path.name}: tensor {info.name!r} has no known HF name; "
                              "this GGUF layout is not supported", key="source")
        qtype = GGMLQuantizationType(info.ggml_type)
        byte_shape = quant_shape_to_byte_shape(info.shape, qtype)
        nbytes = int(np.prod(byte_shape))
        raw = data[info.offset:info.offset + nbytes].reshape(byte_shape)
        weights = dequantize(raw, qtype).astype(np.float32, copy=False)
        if file_arch == "llama" and ".attn_q." in info.name:
            weights = _unpermute_rows(weights, arch.num_heads)
        elif file_arch == "llama" and ".attn_k." in info.name:
            weights = _unpermute_rows(weights, arch.num_kv_heads)
        elif file_arch == "gemma3" and "norm.weight" in info.name:
            weights = weights - 1
        yield hf_name, weights


def convert_gguf_tokenizer(path: Path, out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json (and chat_template.jinja if the file has one)
    to ``out_dir``, converted by transformers from the GGUF metadata (10-20 s, so callers cache it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.save_pretrained(str(out_dir))
