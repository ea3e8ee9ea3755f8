"""Latency of the first request of each kind on a running server, then of the same requests
again: what a fresh server pays on first use of a path (CUDA's lazy module loading, Triton's
first launches, the eager prompt-scoring forward), which every stream running at that moment
waits out too.

    python3 bench/first_requests.py http://127.0.0.1:8000 MODEL [--rounds 2]

Start the server just before (for a cold Triton cache: ``TRITON_CACHE_DIR`` set to an empty
directory). The 12 kinds: greedy (two prompts), a long prompt (two; 1,351 tokens with a byte
tokenizer: serve with ``--max-model-len 2048`` or more), top-p, top-k + min-p, repetition +
presence penalty, logprobs, echo + logprobs, n=3 seeded, a streamed chat, a stop string. Prints
milliseconds per request and round (docs/benchmarks.md, session 19).
"""

from __future__ import annotations

import argparse
import time

import httpx

LONG = "The quick brown fox jumps over the lazy dog. " * 30
KINDS = [
    ("greedy", "/v1/completions", {"prompt": "Hello", "max_tokens": 16, "temperature": 0}),
    ("greedy, other prompt", "/v1/completions",
     {"prompt": "Hello there", "max_tokens": 16, "temperature": 0}),
    ("long prompt", "/v1/completions", {"prompt": LONG, "max_tokens": 16, "temperature": 0}),
    ("long prompt, other", "/v1/completions",
     {"prompt": LONG + " again", "max_tokens": 16, "temperature": 0}),
    ("top-p", "/v1/completions",
     {"prompt": "Hello", "max_tokens": 16, "temperature": 0.8, "top_p": 0.9}),
    ("top-k + min-p", "/v1/completions",
     {"prompt": "Hello", "max_tokens": 16, "temperature": 0.7, "top_k": 20, "min_p": 0.05}),
    ("repetition penalty", "/v1/completions",
     {"prompt": "Hello", "max_tokens": 16, "repetition_penalty": 1.2,
      "presence_penalty": 0.5}),
    ("logprobs", "/v1/completions", {"prompt": "Hello", "max_tokens": 16, "logprobs": 3}),
    ("echo + logprobs", "/v1/completions",
     {"prompt": "Hello world, how are", "max_tokens": 4, "logprobs": 2, "echo": True}),
    ("n=3 seeded", "/v1/completions",
     {"prompt": "Hello", "max_tokens": 16, "n": 3, "seed": 7, "temperature": 1.0}),
    ("chat, streamed", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "stream": True}),
    ("stop string", "/v1/completions", {"prompt": "Hello", "max_tokens": 32, "stop": ["zz"]}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("model")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    client = httpx.Client(base_url=args.url, timeout=300)
    times: dict[str, list[float]] = {name: [] for name, _, _ in KINDS}
    for _ in range(args.rounds):
        for name, path, body in KINDS:
            start = time.perf_counter()
            response = client.post(path, json={**body, "model": args.model})
            times[name].append(1e3 * (time.perf_counter() - start))
            if response.status_code != 200:
                print(f"{name}: HTTP {response.status_code} {response.text[:200]}")
    print(f"{'request':22} " + " ".join(f"{'round ' + str(r + 1):>9}" for r in range(args.rounds))
          + "   (ms)")
    for name, values in times.items():
        print(f"{name:22} " + " ".join(f"{v:9.1f}" for v in values))


if __name__ == "__main__":
    main()
