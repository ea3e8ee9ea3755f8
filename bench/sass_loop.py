"""SASS instruction counts of the decode attention kernel's key loop, compiled for sm_90 on a
machine without a GPU (no device time): per warp per iteration, and per 64 keys per program.

    PYTHONPATH=src python3 bench/sass_loop.py [--warps 1,2,4,8] [--stages 2,3] [--block-n 32,64,128]
        [--group 7] [--head-dim 64] [--T 16] [--kv-heads 2] [--layers 24]

Needs a Triton wheel with its NVIDIA backend (ptxas, nvdisasm and cuobjdump ship in it; the
version should match the GPU machine's, e.g. ``pip download triton==3.6.0 --no-deps`` unpacked onto PYTHONPATH,
with ``chmod +x triton/backends/nvidia/bin/*``). Pointers and strides are specialised as 16-byte
divisible, as the launcher does on the GPU (without that, loads are not vectorised and the counts
mean nothing). The loop is the innermost backward branch whose body holds an HMMA. Counts are
static (each instruction of the loop once); Nsight Compute's dynamic mix on the GPU
(``bench/gpu_attention_ncu.py``) agreed within ~30 % for the default config (session 12).
Fewer instructions is not faster by itself: a variant with 15 % fewer a 64-key tile but 95
registers a thread instead of 64 ran 1.3-1.7x slower (session 12), so the registers are printed
too (``cuobjdump --dump-resource-usage``).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

INTEGER = ("IMAD", "SHF", "ISETP", "LEA", "VIADD", "SEL", "IADD3", "LOP3", "PLOP3")


def compile_sm90(fn, signature: dict, constexprs: dict, div16: list[str], num_warps: int,
                 num_stages: int):
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _cubin_tool(kernel, tool: str, *args: str) -> str:
    """The output of one of the wheel's CUDA binary tools run on ``kernel``'s cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    exe = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin", tool)
    try:
        return subprocess.run([exe, *args, path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)


def disassemble(kernel) -> str:
    return _cubin_tool(kernel, "nvdisasm", "-c")


def registers(kernel) -> int:
    """Registers a thread (``cuobjdump --dump-resource-usage``): with the shared memory, what
    decides how many programs an SM holds."""
    m = re.search(r"REG:(\d+)", _cubin_tool(kernel, "cuobjdump", "--dump-resource-usage"))
    return int(m.group(1)) if m else -1


def loop_opcodes(sass: str) -> collections.Counter:
    """Opcodes of the smallest loop (a backward branch's body) that holds an HMMA."""
    code: list[tuple[int, str]] = []
    label_at: dict[str, int] = {}
    pending = None
    for line in sass.splitlines():
        s = line.strip()
        m = re.match(r"\.(L_x_\d+):", s)
        if m:
            pending = m.group(1)
            continue
        m = re.match(r"/\*([0-9a-f]+)\*/\s+(.*)", s)
        if m:
            addr = int(m.group(1), 16)
            if pending:
                label_at[pending], pending = addr, None
            code.append((addr, m.group(2)))
    best: list[str] | None = None
    for addr, ins in code:
        m = re.search(r"BRA\s+\S*?(L_x_\d+)", ins)
        if m and label_at.get(m.group(1), addr + 1) < addr:
            body = [i for a, i in code if label_at[m.group(1)] <= a <= addr]
            if any("HMMA" in i for i in body) and (best is None or len(body) < len(best)):
                best = body
    counts: collections.Counter = collections.Counter()
    for ins in best or []:
        m = re.match(r"(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)", ins)
        if m:
            counts[m.group(2)] += 1
    return counts


def decode_attention_args(group: int, head_dim: int, T: int, block_n: int, kv_heads: int,
                          layers: int):
    """The kernel's signature for a model alone in its pool (``kv_pool.layer_views``'s strides:
    a block holds every layer's K and V of T tokens)."""
    ints = ["window", "num_splits", "partition_size", "stride_qn", "stride_qh", "stride_on",
            "stride_oh", "stride_bt"]
    signature = {"q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
                 "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "count_ptr": "*i32",
                 "out_ptr": "*bf16", "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32",
                 "scale": "fp32", "softcap": "fp32", **{n: "i32" for n in ints}}
    constexprs = {"T": T, "GROUP": group, "BLOCK_G": max(16, triton.next_power_of_2(group)),
                  "HEAD_DIM": head_dim, "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
                  "BLOCK_N": block_n, "USE_WINDOW": False, "USE_SOFTCAP": False, "DIRECT": False,
                  "COUNTED": False, "PRECISION": "tf32", "USE_PDL": True, "PDL_EARLY": True,
                  "stride_cb": 2 * layers * T * kv_heads * head_dim,
                  "stride_ct": kv_heads * head_dim, "stride_ch": head_dim}
    signature.update({name: "constexpr" for name in constexprs})
    div16 = [n for n, t in signature.items() if t.startswith("*")]
    div16 += [n for n in ints if n.startswith("stride") or n == "partition_size"]
    return signature, constexprs, div16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warps", default="1,2,4,8")
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--block-n", default="32,64,128")
    ap.add_argument("--group", type=int, default=7, help="query heads per kv head")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--T", type=int, default=16, help="tokens per block")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=24)
    args = ap.parse_args()
    module = importlib.import_module("modelhive.kernels.triton.paged_attention")
    print(f"triton {triton.__version__}, decode attention, group {args.group}, head dim "
          f"{args.head_dim}, T {args.T}")
    for warps in map(int, args.warps.split(",")):
        for stages in map(int, args.stages.split(",")):
            for block_n in map(int, args.block_n.split(",")):
                sig, cx, div16 = decode_attention_args(args.group, args.head_dim, args.T, block_n,
                                                    args.kv_heads, args.layers)
                kernel = compile_sm90(module._decode_kernel, sig, cx, div16, warps, stages)
                ops = loop_opcodes(disassemble(kernel))
                n = sum(ops.values())
                print(f"warps {warps} stages {stages} BLOCK_N {block_n:3d}: {n:5d} a warp an "
                      f"iteration, {n * warps * 64 // block_n:5d} a program per 64 keys "
                      f"(integer {sum(ops[o] for o in INTEGER)}, HMMA {ops['HMMA']}, "
                      f"BAR {ops['BAR']}); {registers(kernel)} registers, shared memory "
                      f"{kernel.metadata.shared} B")


if __name__ == "__main__":
    main()
