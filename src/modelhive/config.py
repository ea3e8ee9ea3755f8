"""Frozen user-facing specs: ModelSpec (one served model), HiveConfig (a config file), memory sizes.

A spec is what the user asked for; anything computed from it (block counts, resolved dtype, token
budgets) lives in separate resolved objects (``planner.MemoryPlan``), never written back here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

from modelhive.errors import ConfigError

DTYPES = ("auto", "float32", "float16", "bfloat16")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve.

    ``source``: a local HF directory, a ``.gguf`` file, ``package:NAME`` or ``preset:NAME``.
    ``dtype``: ``auto`` picks float32 on CPU and bfloat16 on CUDA (float16 if the checkpoint is
    float16). ``max_model_len``: prompt + output tokens per sequence (default: the architecture's
    limit, capped at 4096). ``max_num_seqs``: sequences a step runs at most (default: 256 on
    CUDA, as vLLM's server; 64 on the CPU). ``kv_min_tokens`` / ``kv_max_tokens``: guaranteed KV
    and optional cap,
    in tokens of this model. ``priority``: higher is preempted last. ``weight``: this model's
    share of a step's token budget while several models have work (weighted max-min fairness).
    """

    name: str
    source: str
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_min_tokens: int = 0
    kv_max_tokens: int | None = None
    priority: int = 0
    weight: float = 1.0
    port: int | None = None
    chat_template: str | None = None
    max_queue: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ConfigError(f"model name {self.name!r} must be 1-128 letters, digits or ._:/-", key="name")
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"model {self.name}: source must be a non-empty string", key="source")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model {self.name}: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}",
                              key="dtype")
        for key in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "kv_max_tokens",
                    "port"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"model {self.name}: {key} must be a positive integer, got {value!r}", key=key)
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue <= 0:
            raise ConfigError(f"model {self.name}: max_queue must be a positive integer, "
                              f"got {self.max_queue!r}", key="max_queue")
        if isinstance(self.kv_min_tokens, bool) or not isinstance(self.kv_min_tokens, int) or self.kv_min_tokens < 0:
            raise ConfigError(f"model {self.name}: kv_min_tokens must be an integer >= 0", key="kv_min_tokens")
        if self.kv_max_tokens is not None and self.kv_max_tokens < self.kv_min_tokens:
            raise ConfigError(f"model {self.name}: kv_max_tokens must be >= kv_min_tokens", key="kv_max_tokens")
        if (isinstance(self.weight, bool) or not isinstance(self.weight, (int, float))
                or not 0 < self.weight <= 1000):
            raise ConfigError(f"model {self.name}: weight must be a number in (0, 1000], "
                              f"got {self.weight!r}", key="weight")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ConfigError(f"model {self.name}: priority must be an integer", key="priority")


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value: str | int | float, total_bytes: int | None = None, key: str = "memory") -> int:
    """Bytes from ``"32GiB"``, ``"500MB"``, an int of bytes, or a fraction of ``total_bytes`` (0 < f <= 1)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like 8GiB or a fraction like 0.9, got {value!r}", key=key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if 0 < value <= 1:
            if total_bytes is None:
                raise ConfigError(f"{key}: a fraction needs a device with known total memory", key=key)
            return int(value * total_bytes)
        if value > 1 and float(value).is_integer():
            return int(value)
        raise ConfigError(f"{key}: must be a positive size like 8GiB or a fraction in (0, 1], got {value!r}", key=key)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            number, unit = float(m.group(1)), (m.group(2) or "")
            if not unit:
                return parse_memory(number, total_bytes, key)
            result = int(number * _UNITS[unit.lower()])
            if result > 0:
                return result
    raise ConfigError(f"{key}: must be a size like 8GiB or a fraction like 0.9, got {value!r}", key=key)


# ------------------------------------------------------------------------------- hive config
DEVICES = ("auto", "cpu", "cuda")
POLICIES = ("shared", "static")
_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelSpec)}
_MODEL_STR_KEYS = ("name", "source", "dtype", "chat_template")
_TOP_KEYS = ("memory", "device", "policy", "enforce_eager", "host", "port", "models")


@dataclass(frozen=True)
class HiveConfig:
    """Everything one ``modelhive serve`` runs: the models and the device budget they share.

    ``memory``: absolute (``"20GiB"``, bytes) or a fraction of the device's total memory; ``None``
    lets the planner choose (``planner.memory.plan_memory``). ``device``: ``auto`` picks CUDA when
    present. ``policy``: ``shared`` (one elastic KV pool) or ``static`` (fixed per-model shares).
    """

    models: tuple[ModelSpec, ...]
    memory: str | int | float | None = None
    device: str = "auto"
    policy: str = "shared"
    enforce_eager: bool = False
    host: str | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("models: at least one model is required", key="models")
        names = [m.name for m in self.models]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"models: the name {name!r} is used twice", key="name")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}",
                              key="device")
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}",
                              key="policy")
        if not isinstance(self.enforce_eager, bool):
            raise ConfigError("enforce_eager must be true or false", key="enforce_eager")
        if self.memory is not None:
            parse_memory(self.memory, total_bytes=2**40, key="memory")  # syntax and sign only
        if self.host is not None and (not isinstance(self.host, str) or not self.host):
            raise ConfigError("host must be a non-empty string", key="host")
        if self.port is not None and (isinstance(self.port, bool) or not isinstance(self.port, int)
                                      or not 0 < self.port < 65536):
            raise ConfigError(f"port must be an integer in 1-65535, got {self.port!r}", key="port")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; other values pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _model_spec(entry: object, where: str) -> ModelSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(entry).__name__}",
                          key="models")
    unknown = sorted(set(entry) - _MODEL_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: "
                          f"{', '.join(sorted(_MODEL_KEYS))}", key=str(unknown[0]))
    for key in ("name", "source"):
        if key not in entry:
            raise ConfigError(f"{where}: missing required key {key!r}", key=key)
    for key in _MODEL_STR_KEYS:
        if key in entry and entry[key] is not None and not isinstance(entry[key], str):
            raise ConfigError(f"{where}: {key} must be a string, got {entry[key]!r}", key=key)
    try:
        return ModelSpec(**entry)
    except ConfigError as exc:
        message = str(exc).removeprefix(f"model {entry['name']}: ")
        raise ConfigError(f"{where}: {message}", key=exc.key) from None


def config_from_dict(data: object, origin: str = "config") -> HiveConfig:
    """Validate a parsed YAML/JSON document; errors are one line naming the bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level", key="config")
    unknown = sorted(set(data) - set(_TOP_KEYS), key=str)
    if unknown:
        raise ConfigError(f"{origin}: unknown key {unknown[0]!r}; known keys: "
                          f"{', '.join(_TOP_KEYS)}", key=str(unknown[0]))
    raw = data.get("models")
    if isinstance(raw, dict):  # mapping form: {name: {source: ...}}
        entries = [{"name": name, **(v if isinstance(v, dict) else {"source": v})}
                   for name, v in raw.items()]
    elif isinstance(raw, list):
        entries = raw
    else:
        raise ConfigError(f"{origin}: models must be a list (or mapping) of models", key="models")
    specs = tuple(_model_spec(e, f"{origin}: models[{i}]" + (
        f" ({e['name']})" if isinstance(e, dict) and "name" in e else ""))
        for i, e in enumerate(entries))
    settings = {k: v for k, v in data.items() if k != "models"}
    for key in ("device", "policy"):
        if key in settings and not isinstance(settings[key], str):
            raise ConfigError(f"{origin}: {key} must be a string", key=key)
    try:
        return HiveConfig(models=specs, **settings)
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}", key=exc.key) from None


def load_config(path: str | os.PathLike) -> HiveConfig:
    """Read a YAML config file into a ``HiveConfig`` (see examples/ for the format)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}", key="config") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(exc, 'problem', exc)}",
                          key="config") from None
    return config_from_dict(data, origin=str(path))
