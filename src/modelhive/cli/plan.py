"""`modelhive plan CONFIG.yaml`: the memory plan of a config, computed without loading weights.

Exit status 0 when the plan fits, 1 (with the one-sentence problem on stderr) when it does not.
``--total-memory`` gives the device's total memory when the GPU is not on this machine: fraction
budgets (``--memory 0.9``) and the vLLM arithmetic of ``--emit`` are taken of it. Without it,
``--emit`` assumes the RTX 5090 of the three-container setup (32,607 MiB as torch reports it).
``--emit`` always plans for CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from modelhive.config import HiveConfig, load_config, parse_memory, resolve_device
from modelhive.errors import ConfigError
from modelhive.models.arch import ArchConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see examples/)")
    parser.add_argument("--memory", help="budget: a size like 32GiB, or a fraction of total memory")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the config's")
    parser.add_argument("--policy", choices=("shared", "static"), help="default: the config's")
    parser.add_argument("--total-memory", metavar="SIZE",
                        help="the device's total memory, when it is not this machine's")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--emit", choices=("vllm", "compose"),
                        help="print `vllm serve` commands or a docker-compose file instead")


def _total_device_bytes(device: str, total_memory: str | None) -> int | None:
    """The device's total memory: --total-memory, else the local GPU's or this machine's RAM."""
    if total_memory is not None:
        return parse_memory(total_memory, key="total-memory")
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def resolve_archs(config: HiveConfig, origin: str = "config") -> dict[str, ArchConfig]:
    """Each model's architecture from its source (config.json, GGUF header, preset; no weights)."""
    from modelhive.models.loader import resolve_source

    archs = {}
    for spec in config.models:
        try:
            archs[spec.name] = resolve_source(spec.source).arch
        except ConfigError as exc:
            raise ConfigError(f"{origin}: model {spec.name}: {exc}",
                              key=exc.key or "source") from None
    return archs


def run(args: argparse.Namespace) -> int:
    from modelhive.planner.memory import plan_memory
    from modelhive.planner.report import format_plan, plan_to_dict

    config = load_config(args.config)
    device = "cuda" if args.emit else resolve_device(args.device or config.device)
    policy = args.policy or config.policy
    total = _total_device_bytes(device, args.total_memory)
    archs = resolve_archs(config, origin=args.config)
    common = dict(device=device, budget=args.memory or config.memory, total_device_bytes=total,
                  enforce_eager=config.enforce_eager)
    plan = plan_memory(config.models, archs, policy=policy, **common)
    other = "static" if policy == "shared" else "shared"
    compare = plan_memory(config.models, archs, policy=other, **common)

    if args.emit and plan.fits:
        from modelhive.planner import emit

        ports = {s.name: s.port for s in config.models}
        write = emit.emit_vllm if args.emit == "vllm" else emit.emit_compose
        sys.stdout.write(write(plan, total or emit.DEFAULT_TOTAL_BYTES, ports=ports,
                               enforce_eager=config.enforce_eager))
    elif args.json:
        print(json.dumps(plan_to_dict(plan, compare), indent=2))
    elif not args.emit:
        print(format_plan(plan, compare))
    if not plan.fits:
        print(f"modelhive plan: error: {plan.problem}", file=sys.stderr)
        return 1
    return 0
