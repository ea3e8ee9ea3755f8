"""``modelhive bench latency|throughput|three-models``: offline benchmarks on CUDA, no HTTP.

Each prints tok/s, ms per token, achieved GB/s and the % of the memory roofline (bytes a step must
read over a copy bandwidth measured in the same process) and the ratio to transformers
``generate`` on the same weights, measured in the same process. ``--json`` writes every number;
``--plot`` a PNG when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import sys

from modelhive.errors import ConfigError
from modelhive.planner.estimates import DECODE_STEPS

THREE = ["preset:tinyllama-1.1b", "preset:qwen2.5-3b", "preset:yi-6b"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)
    lat = sub.add_parser("latency", help="batch decode speed: prompt 128, 128 new tokens")
    lat.add_argument("--model", action="append", help="preset:NAME (repeatable); "
                     "default preset:tinyllama-1.1b")
    lat.add_argument("--batch-size", type=int, action="append", help="repeatable; default 1")
    lat.add_argument("--prompt-len", type=int, default=128)
    lat.add_argument("--new-tokens", type=int, default=128)
    lat.add_argument("--baseline-tokens", type=int, default=32,
                     help="new tokens for the transformers baseline (0: skip it)")
    thr = sub.add_parser("throughput", help="N requests, lengths uniform in [min, max], all at once")
    thr.add_argument("--model", default="preset:qwen2.5-0.5b")
    thr.add_argument("--num-requests", type=int, default=256)
    thr.add_argument("--min-len", type=int, default=100)
    thr.add_argument("--max-len", type=int, default=1024)
    thr.add_argument("--max-num-seqs", type=int, default=256)
    thr.add_argument("--baseline-tokens", type=int, default=64)
    thr.add_argument("--temperature", type=float, default=0.0,
                     help="every request's sampling temperature (default 0: greedy)")
    thr.add_argument("--top-p", type=float, default=1.0)
    thr.add_argument("--top-k", type=int, default=0)
    thr.add_argument("--repetition-penalty", type=float, default=1.0)
    thr.add_argument("--presence-penalty", type=float, default=0.0)
    thr.add_argument("--frequency-penalty", type=float, default=0.0)
    thr.add_argument("--logprobs", type=int, default=None,
                     help="every request asks for its tokens' logprobs and this many alternatives")
    three = sub.add_parser("three-models", help="three architectures in one hive, 10-token replies")
    three.add_argument("--model", action="append", help=f"repeatable; default {' '.join(THREE)}")
    three.add_argument("--new-tokens", type=int, default=10)
    three.add_argument("--rounds", type=int, default=5)
    three.add_argument("--no-baseline", action="store_true")
    from modelhive.bench.load import command as serve_command  # HTTP load generator, any device

    serve_command.add_arguments(sub.add_parser("serve", help="load a running server over HTTP"))
    for p in (lat, thr, three):
        p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
        p.add_argument("--decode-steps", type=int, default=DECODE_STEPS,
                       help="greedy decode steps per multi-step CUDA graph (1: none; default "
                            "%(default)s, planner.estimates.DECODE_STEPS)")
        p.add_argument("--json", help="write the results to this file")
        p.add_argument("--plot", help="write a PNG bar chart here (needs matplotlib)")


def _print(results: list[dict], bandwidth: float, device_name: str) -> None:
    print(f"# {device_name}; measured copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for r in results:
        graphs = "eager" if r["enforce_eager"] else "graphs"
        if r["bench"] == "latency":
            hf = (f"  hf {r['hf_tok_s']:.1f} tok/s  x{r['speedup_vs_hf']:.1f}"
                  if "hf_tok_s" in r else "")
            replay = (f"  (graph replay {r['graph_replay_ms']:.3f} ms = "
                      f"{r['pct_roofline_gpu_only']:.0f}%)" if r["graph_replay_ms"] else "")
            print(f"latency {r['model']} b={r['batch']} {graphs}: {r['decode_tok_s']:.1f} tok/s, "
                  f"{r['ms_per_step']:.3f} ms/step, {r['achieved_GB_s']:.0f} GB/s, "
                  f"{r['pct_roofline']:.1f}% of roofline ({r['roofline_tok_s']:.0f} tok/s)"
                  f"{replay}{hf}")
        elif r["bench"] == "throughput":
            hf = (f"  hf {r['hf_tok_s']:.1f} tok/s  x{r['speedup_vs_hf']:.1f}"
                  if "hf_tok_s" in r else "")
            drawn = ", ".join(f"{k} {v}" for k, v in r["sampling"].items())
            print(f"throughput {r['model']} n={r['num_requests']} {graphs} ({drawn}): "
                  f"{r['tok_s']:.0f} tok/s "
                  f"({r['output_tokens']} tokens in {r['seconds']:.1f} s, {r['steps']} steps, "
                  f"{r['ms_per_step']:.2f} ms/step), {r['achieved_GB_s']:.0f} GB/s, "
                  f"{r['pct_roofline']:.1f}% of the workload's roofline{hf}")
            print(f"  steps: {r['prompt_steps']} with prompt chunks, {r['ahead_steps']} launched "
                  f"ahead; {r['runner_s']:.2f} s in the runner ({r['runner_prompt_s']:.2f} s of it "
                  f"in steps with prompt chunks), "
                  f"{r['seconds'] - r['runner_s']:.2f} s of engine host work around it")
        else:
            for m, e in r["per_model"].items():
                hf = (f"  hf {e['hf_ms_per_reply']:.1f} ms  x{e['speedup_vs_hf']:.1f}"
                      if "hf_ms_per_reply" in e else "")
                print(f"three-models {m} {graphs}: {e['ms_per_reply']:.2f} ms per "
                      f"{r['new_tokens']}-token reply ({e['ms_per_token']:.2f} ms/token; first "
                      f"token {e['ms_first_token']:.2f} ms, {e['prompt_tokens']} prompt tokens), "
                      f"{e['pct_roofline']:.1f}% of roofline{hf}")


def run(args: argparse.Namespace) -> int:
    if args.bench == "serve":
        from modelhive.bench.load import command as serve_command

        return serve_command.run(args)
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("modelhive bench needs a CUDA device (the numbers are GPU roofline "
                          "numbers); none is available")
    from modelhive.bench import offline
    from modelhive.bench.plot import plot_results
    from modelhive.bench.roofline import measure_copy_bandwidth

    bandwidth = measure_copy_bandwidth()
    setup = offline.Setup(enforce_eager=args.enforce_eager, bandwidth=bandwidth,
                          decode_steps=args.decode_steps)
    results = []
    if args.bench == "latency":
        for model in args.model or ["preset:tinyllama-1.1b"]:
            for batch in args.batch_size or [1]:
                results.append(offline.latency(model, setup, batch, args.prompt_len,
                                               args.new_tokens, args.baseline_tokens))
    elif args.bench == "throughput":
        sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                    "repetition_penalty": args.repetition_penalty,
                    "presence_penalty": args.presence_penalty,
                    "frequency_penalty": args.frequency_penalty, "logprobs": args.logprobs}
        results.append(offline.throughput(args.model, setup, args.num_requests, args.min_len,
                                          args.max_len, args.max_num_seqs, args.baseline_tokens,
                                          sampling=sampling))
    else:
        results.append(offline.three_models(args.model or THREE, setup, args.new_tokens,
                                            args.rounds, not args.no_baseline))
    device_name = torch.cuda.get_device_name()
    _print(results, bandwidth, device_name)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "copy_bandwidth_bytes_s": bandwidth,
                       "torch": torch.__version__, "results": results}, f, indent=2)
    if args.plot and not plot_results(results, args.plot):
        print("matplotlib is not installed: no plot", file=sys.stderr)
    return 0
