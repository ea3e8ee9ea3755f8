"""`modelhive ps [--url URL] [--api-key KEY] [--json]`: a running server's models and memory.

Like `ollama ps`: one row per loaded model (NAME, SIZE, KV used / reachable, PROCESSOR, CONTEXT),
with the memory plan beside what the server process measured; then the hive-wide terms. Reads
``GET /v1/hive/ps`` (server/routes/ps.py); ``--json`` prints that body unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request

from modelhive.errors import ModelhiveError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000",
                        help="the server's main address (default http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=os.environ.get("MODELHIVE_API_KEY"),
                        help="the server's API key (also env MODELHIVE_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print the JSON body")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")


def fetch(url: str, api_key: str | None, timeout: float) -> dict:
    request = urllib.request.Request(url.rstrip("/") + "/v1/hive/ps")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise ModelhiveError(f"{url} answered {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelhiveError(f"cannot reach a modelhive server at {url} ({reason}); start one "
                             "with `modelhive serve` or pass --url") from None


def gb(num_bytes: int | None) -> str:
    """Bytes as GB (MB below 1 GB: tiny models stay readable)."""
    if num_bytes is None:
        return "-"
    return f"{num_bytes / 1e9:.2f} GB" if abs(num_bytes) >= 1e9 else f"{num_bytes / 1e6:.1f} MB"


def diff(measured: int | None, planned: int) -> str:
    if measured is None or not planned:
        return "-"
    return f"{100 * (measured - planned) / planned:+.1f} %"


def table(header: list[str], rows: list[list[str]], right: tuple[int, ...] = ()) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["   ".join(c.rjust(w) if i in right else c.ljust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in [header, *rows]]


def format_ps(body: dict) -> str:
    rows = []
    for m in body["models"]:
        kv, planned, measured = m["kv"], m["planned"], m["measured"]
        rows.append([
            m["name"], gb(m["size_bytes"]), gb(planned["weights"]),
            f"{gb(measured['activation'])} / {gb(planned['activation'])}",
            f"{kv['blocks_used']:,} / {kv['blocks_reachable']:,} blocks "
            f"({kv['tokens_used']:,} / {kv['tokens_reachable']:,} tokens)",
            m["processor"], str(m["context_length"]), f"{m['running']} / {m['waiting']}"])
    lines = table(["NAME", "SIZE", "PLANNED", "ACTIVATION PEAK / PLAN", "KV USED / REACHABLE",
                   "PROCESSOR", "CONTEXT", "RUNNING / WAITING"], rows, right=(1, 2, 6))
    labels = {"process": "process / budget"}
    terms = [[labels.get(t, t), gb(v["planned"]), gb(v["measured"]),
              diff(v["measured"], v["planned"])] for t, v in body["terms"].items()]
    lines += ["", *table(["TERM", "PLANNED", "MEASURED", "DIFF"], terms, right=(1, 2, 3))]
    proc = body["process"]
    extra = [f"device {body['device']}", f"KV pool {body['kv_blocks_total'] - body['kv_blocks_free']:,}"
             f" / {body['kv_blocks_total']:,} blocks used"]
    if proc["torch_reserved_bytes"] is not None:
        extra.append(f"torch reserved {gb(proc['torch_reserved_bytes'])}, allocated "
                     f"{gb(proc['torch_allocated_bytes'])}")
    if proc["nvml_process_bytes"] is not None:
        extra.append(f"NVML {gb(proc['nvml_process_bytes'])}")
    extra.append(f"RSS {gb(proc['rss_bytes'])}")
    return "\n".join([*lines, "", "; ".join(extra)])


def run(args: argparse.Namespace) -> int:
    body = fetch(args.url, args.api_key, args.timeout)
    print(json.dumps(body, indent=2) if args.json else format_ps(body))
    return 0
