"""On-disk cache of converted GGUF models (like Ollama's blobs), so a second start is fast.

Location: ``$MODELHIVE_CACHE_DIR`` (default ``~/.cache/modelhive``). Layout::

    gguf/<key>/arch.json            ArchConfig of the file (read instead of the GGUF header)
    gguf/<key>/weights/             float32 safetensors shards (HF names) + shards.json
    gguf/<key>/tokenizer/           tokenizer.json, tokenizer_config.json, chat_template.jinja
    packages/<package>/<file>.gguf  GGUFs assembled from split packages (sha256 checked once)

Key: sha256 of (resolved path, size, mtime_ns) of the .gguf file. Hashing the content would cost
~1 s per GB on every start; a changed or replaced file changes its size or mtime, so the key still
misses. Each part is written into a temp dir next to its target and renamed into place, so a crash
never leaves a half-written entry (readers only look at complete, renamed dirs). Weights are stored
in float32: dequantized GGUF values are exact in float32, and a load casts to the requested dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from modelhive.models.arch import ArchConfig

SHARD_BYTES = 2 << 30  # at most ~2 GiB of tensors held in memory while writing
CACHE_FORMAT = 1


def cache_root() -> Path:
    return Path(os.environ.get("MODELHIVE_CACHE_DIR") or Path.home() / ".cache" / "modelhive")


def file_key(path: Path) -> str:
    """Cache key of a file: sha256 of its resolved path, size and mtime (see module doc)."""
    stat = path.stat()
    ident = f"{CACHE_FORMAT}\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp dir; on success it is renamed to ``target`` (kept as is if another process won)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: object) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def arch_to_json(arch: ArchConfig) -> dict:
    fields = {f.name: getattr(arch, f.name) for f in dataclasses.fields(arch) if f.name != "extra"}
    fields["rope_scaling"] = [list(pair) for pair in arch.rope_scaling]
    return fields


def arch_from_json(data: dict) -> ArchConfig:
    data = dict(data)
    data["rope_scaling"] = tuple(tuple(pair) for pair in data.get("rope_scaling", ()))
    data["layer_types"] = tuple(data.get("layer_types", ()))
    data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
    return ArchConfig(**data)


def write_weight_shards(out_dir: Path, tensors: Iterable[tuple[str, np.ndarray]]) -> None:
    """Write ``(name, array)`` pairs as safetensors shards of about ``SHARD_BYTES`` each."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    shard_bytes, names = 0, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(out_dir / name))
        names.append(name)
        shard, shard_bytes = {}, 0

    for name, array in tensors:
        shard[name] = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
        shard_bytes += array.nbytes
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard or not names:
        flush()
    (out_dir / "shards.json").write_text(json.dumps(names))


def iter_weight_shards(weights_dir: Path, dtype: torch.dtype,
                       device: torch.device | str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for name in json.loads((weights_dir / "shards.json").read_text()):
        with safe_open(str(weights_dir / name), framework="pt", device="cpu") as file:
            for key in file.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield key, file.get_tensor(key).to(device=device, dtype=dtype)


def assemble_parts(parts: list[Path], expected_sha256: str, target: Path) -> Path:
    """Concatenate ``parts`` into ``target`` once, checking the sha256; later calls return at once.

    A ``<target>.sha256`` marker written after the check means "assembled and verified"."""
    marker = target.with_name(target.name + ".sha256")
    if target.is_file() and marker.is_file() and marker.read_text().strip() == expected_sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as file:
                    while block := file.read(8 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected_sha256:
            raise ValueError(f"sha256 {digest.hexdigest()} != expected {expected_sha256}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    write_text_atomic(marker, expected_sha256)
    return target
