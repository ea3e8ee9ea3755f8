"""`modelhive serve [CONFIG.yaml] [flags]`: load the models, print the memory plan, serve HTTP.

Flags keep vLLM's names. Given a config file, a flag overrides that setting for every model in it
(``--max-model-len``, ``--max-num-seqs``, ``--dtype``, ``--chat-template``) or for the hive
(``--memory``, ``--device``, ``--policy``, ``--enforce-eager``, ``--host``, ``--port``). Without a
config, ``--model SOURCE`` (repeatable) lists the models; ``--served-model-name`` names them in order.

One process, one event loop: the main port serves every model, each model's ``port`` (config only)
serves that model alone; the engine loop runs on its own thread (docs/process-layout.md).
SIGTERM / SIGINT: stop accepting, let in-flight requests finish, stop the engine, exit 0; a second
SIGINT stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from modelhive.config import DTYPES, HiveConfig, ModelSpec, load_config
from modelhive.errors import ConfigError

log = logging.getLogger("modelhive")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (see examples/default.yaml)")
    parser.add_argument("--host", help="address to listen on (default: the config's, else 127.0.0.1)")
    parser.add_argument("--port", type=int, help="main port, every model (default 8000)")
    parser.add_argument("--model", action="append", metavar="SOURCE",
                        help="model source (HF dir, .gguf, package:NAME, preset:NAME); repeatable")
    parser.add_argument("--served-model-name", action="append", metavar="NAME",
                        help="name of the matching --model (in order); default: from the source")
    parser.add_argument("--max-model-len", type=int, help="prompt + output tokens per sequence")
    parser.add_argument("--max-num-seqs", type=int, help="sequences per model per step")
    parser.add_argument("--dtype", choices=DTYPES, help="weights and KV dtype")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="no CUDA graphs (the default on CPU)")
    parser.add_argument("--api-key", default=os.environ.get("MODELHIVE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (also env MODELHIVE_API_KEY)")
    parser.add_argument("--chat-template", metavar="FILE_OR_TEMPLATE",
                        help="Jinja chat template (a file, or the template text) for every model")
    parser.add_argument("--memory", help="the whole process's budget (weights + activations + KV):"
                        " a size like 32GiB, or a fraction of the device's TOTAL memory like 0.9")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--policy", choices=("shared", "static"),
                        help="one elastic KV pool (shared) or fixed per-model shares (static)")
    parser.add_argument("--max-request-bytes", type=int, default=8 * 2**20,
                        help="larger request bodies get 413 (default 8 MiB)")
    parser.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                        help="log every HTTP request (default on)")
    parser.add_argument("--skip-failed-models", action="store_true",
                        help="a model whose source is missing or corrupt is left out (reported in "
                        "/health and /v1/models) instead of refusing to start")


def default_name(source: str) -> str:
    """``preset:tiny-llama`` -> ``tiny-llama``; ``/models/x.gguf`` -> ``x``."""
    if source.startswith(("preset:", "package:")):
        return source.split(":", 1)[1]
    path = Path(source.rstrip("/"))
    return path.stem if path.suffix == ".gguf" else path.name


def _chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    if len(value) < 4096 and "{" not in value:
        if not path.is_file():
            raise ConfigError(f"--chat-template: no file {value}", key="chat_template")
        return path.read_text(encoding="utf-8")
    return value


def build_config(args: argparse.Namespace) -> HiveConfig:
    """The HiveConfig to serve: the config file or --model list, with the flags applied."""
    if args.config and args.model:
        raise ConfigError("give a CONFIG.yaml or --model flags, not both", key="model")
    if args.config:
        if args.served_model_name:
            raise ConfigError("--served-model-name goes with --model; name models in the config",
                              key="served_model_name")
        config = load_config(args.config)
    elif args.model:
        names = args.served_model_name or []
        if len(names) > len(args.model):
            raise ConfigError(f"{len(names)} --served-model-name for {len(args.model)} --model",
                              key="served_model_name")
        names = names + [default_name(s) for s in args.model[len(names):]]
        config = HiveConfig(models=tuple(ModelSpec(name=n, source=s)
                                         for n, s in zip(names, args.model, strict=True)))
    else:
        raise ConfigError("nothing to serve: give a CONFIG.yaml (e.g. examples/default.yaml) or "
                          "--model SOURCE", key="model")
    per_model = {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
                 "dtype": args.dtype, "chat_template": _chat_template(args.chat_template)}
    per_model = {k: v for k, v in per_model.items() if v is not None}
    hive = {"memory": args.memory, "device": args.device, "policy": args.policy,
            "enforce_eager": args.enforce_eager}
    hive = {k: v for k, v in hive.items() if v is not None}
    models = tuple(dataclasses.replace(m, **per_model) for m in config.models)
    return dataclasses.replace(config, models=models, **hive)


def bind(host: str, port: int) -> socket.socket:
    """Bind now (before loading models) so a busy port fails fast with a clear message."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another port",
                          key="port") from None
    return sock


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = build_config(args)
    from modelhive.server.state import ServedConfig

    served = ServedConfig.from_hive_config(config, args.host, args.port, args.max_request_bytes)
    ports = [served.port, *served.model_ports.values()]
    if len(set(ports)) != len(ports):
        raise ConfigError(f"ports must differ: main port {served.port}, model ports "
                          f"{dict(served.model_ports)}", key="port")
    sockets = {}
    try:
        for port in ports:
            sockets[port] = bind(served.host, port)
        engine = _load(config, args.skip_failed_models)
        for name, reason in engine.failed_models.items():
            print(f"WARNING: model {name} is not served: {reason}", flush=True)
            port = served.model_ports.get(name)
            if port is not None:  # its own port has nothing to serve
                sockets.pop(port).close()
        if engine.failed_models:
            served = dataclasses.replace(served, model_ports={
                n: p for n, p in served.model_ports.items() if n not in engine.failed_models})
    except BaseException:
        for sock in sockets.values():
            sock.close()
        raise
    from modelhive.engine.client import AsyncEngine
    from modelhive.engine.hive import settle_for_serving
    from modelhive.planner.report import format_plan

    print(format_plan(engine.plan), flush=True)
    settle_for_serving()  # the engine lives as long as the process
    async_engine = AsyncEngine(engine)
    async_engine.start()
    _print_urls(served, list(engine.models))
    run_event_loop(_serve(async_engine, served, sockets, args))
    return 0


def run_event_loop(main) -> None:
    """Run ``main`` on uvloop where it is installed (every platform but Windows; the loop
    uvicorn picks itself when it owns the loop), else on asyncio's own loop. With httptools it
    took the event loop's time per streamed token from 37-40 to 30-34 us on a 2-core CPU
    (docs/process-layout.md)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def _load(config: HiveConfig, skip_failed: bool = False):
    from tqdm import tqdm

    from modelhive.engine.hive import build_engine, build_engine_skipping_failed

    build = build_engine_skipping_failed if skip_failed else build_engine

    with tqdm(total=len(config.models), desc="loading models", unit="model",
              file=sys.stderr) as bar:
        def loaded(name: str) -> None:
            bar.set_postfix_str(name)
            bar.update(1)

        return build(config.models, config.device, config.memory, config.policy,
                     config.enforce_eager, on_model_loaded=loaded)


def _print_urls(served, models: list[str]) -> None:
    print(f"serving {', '.join(models)} at http://{served.host}:{served.port}/v1", flush=True)
    for name, port in served.model_ports.items():
        print(f"  {name} only at http://{served.host}:{port}/v1", flush=True)


async def _serve(async_engine, served, sockets: dict, args: argparse.Namespace) -> None:
    import uvicorn

    from modelhive.server.app import create_app
    from modelhive.server.metrics import ServerMetrics

    class Server(uvicorn.Server):
        def capture_signals(self):  # the signals are ours: one handler stops every server
            import contextlib

            return contextlib.nullcontext()

    metrics = ServerMetrics(async_engine)
    fixed = {served.port: None, **{port: name for name, port in served.model_ports.items()}}
    servers = []
    for port, model in fixed.items():
        app = create_app(async_engine, served, args.api_key, metrics=metrics, fixed_model=model)
        config = uvicorn.Config(app, log_level="info", access_log=args.access_log,
                                timeout_graceful_shutdown=60, timeout_keep_alive=30)
        servers.append((Server(config), sockets[port]))

    def stop(signum: int) -> None:
        log.info("signal %s: finishing in-flight requests, then exiting", signal.Signals(signum).name)
        for server, _ in servers:
            server.force_exit = server.should_exit  # a second signal: stop now
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signum)
    try:
        await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in servers))
    finally:
        await asyncio.to_thread(async_engine.shutdown)
        log.info("engine stopped")
