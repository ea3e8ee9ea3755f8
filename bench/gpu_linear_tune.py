"""Decode linears on the GPU: the fused Triton kernel (``kernels/triton/fused_linear.py``) against
the unfused path (separate norm / activation / add kernels + cuBLAS), per layer shape of the
benchmark presets, at decode batch sizes. Each op is timed inside a CUDA graph of 20 calls (what a
decode graph replays), so launch gaps count as they do in a real step.

    PYTHONPATH=src python3 bench/gpu_linear_tune.py [--sweep] [--json out.json]

``--sweep`` also tries a grid of tile configs for the plain (no prologue) kernel and prints the
best per shape next to ``pick_config``'s choice.
"""

from __future__ import annotations

import argparse
import itertools
import json
from functools import partial

import torch
import torch.nn.functional as F

from modelhive.kernels.triton import activation, fused_linear, rmsnorm
from modelhive.models.presets import preset_arch

PRESETS = ["tinyllama-1.1b", "qwen2.5-3b", "yi-6b", "qwen2.5-0.5b"]
REPS = 20


def graph_time_us(fn) -> float:
    """Median microseconds per call of ``fn`` replayed in a CUDA graph of ``REPS`` calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            fn()
    g.replay()
    times = []
    for _ in range(7):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / REPS)
    return sorted(times)[len(times) // 2]


def shapes(preset: str):
    a = preset_arch(preset)
    h, q, kv, inter = a.hidden_size, a.q_size, a.num_kv_heads * a.head_dim, a.intermediate_size
    return [("qkv", q + 2 * kv, h, "rmsnorm"), ("o", h, q, "add"),
            ("gate_up", 2 * inter, h, "rmsnorm"), ("down", h, inter, "silu")]


def make_ops(kind: str, w, nw, xin, res):
    """(unfused, fused(cfg=None)) callables for one layer linear of ``kind``."""
    if kind == "rmsnorm":
        def unfused():
            return F.linear(rmsnorm.rms_norm(xin, nw, 1e-6), w)

        def fused(cfg=None):
            return fused_linear.fused_linear(xin, w, prologue="rmsnorm", norm_weight=nw,
                                             eps=1e-6, config=cfg)
    elif kind == "add":
        def unfused():
            return torch.addmm(res, xin, w.t())

        def fused(cfg=None):
            return fused_linear.fused_linear(xin, w, residual=res, config=cfg)
    else:
        def unfused():
            return torch.addmm(res, activation.silu_and_mul(xin), w.t())

        def fused(cfg=None):
            return fused_linear.fused_linear(xin, w, prologue="silu", residual=res, config=cfg)
    return unfused, fused


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--m", type=int, action="append")
    ap.add_argument("--json")
    args = ap.parse_args()
    ms = args.m or [1, 8, 32, 64]
    dt = torch.bfloat16
    dev = "cuda"
    rows = []
    grid = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=s)
            for bn, bk, s in itertools.product([16, 32, 64], [128, 256], [3, 5])]
    grid += [dict(BLOCK_N=32, BLOCK_K=512, num_warps=8, num_stages=3),
             dict(BLOCK_N=64, BLOCK_K=128, num_warps=8, num_stages=4)]
    print(f"{'preset':15} {'op':8} {'N':>6} {'K':>6} {'M':>3} | {'unfused':>8} {'cublas':>8} "
          f"{'fused':>8} {'best':>8} | GB/s fused  best config")
    for preset in PRESETS:
        for name, n, k, kind in shapes(preset):
            w = torch.randn(n, k, dtype=dt, device=dev) / k ** 0.5
            nw = torch.randn(k, dtype=dt, device=dev)
            for m in ms:
                xin = torch.randn(m, 2 * k if kind == "silu" else k, dtype=dt, device=dev)
                res = torch.randn(m, n, dtype=dt, device=dev)
                x_plain = torch.randn(m, k, dtype=dt, device=dev)
                unfused, fused = make_ops(kind, w, nw, xin, res)
                t_unf = graph_time_us(unfused)
                t_cub = graph_time_us(partial(F.linear, x_plain, w))
                t_fus = graph_time_us(fused)
                ref = unfused().float()
                err = ((fused().float() - ref).norm() / ref.norm()).item()
                best, best_cfg = t_fus, "pick"
                if args.sweep:
                    bm = fused_linear.pick_config(m, n, k)["BLOCK_M"]
                    for cfg in grid:
                        cfg = {**cfg, "BLOCK_M": bm}
                        try:
                            t = graph_time_us(partial(fused, cfg))
                        except Exception as exc:  # e.g. out of shared memory
                            print("  config failed", cfg, type(exc).__name__)
                            continue
                        if t < best:
                            best, best_cfg = t, cfg
                gbs = n * k * 2 / (t_fus * 1e-6) / 1e9
                print(f"{preset:15} {name:8} {n:6} {k:6} {m:3} | {t_unf:8.2f} {t_cub:8.2f} "
                      f"{t_fus:8.2f} {best:8.2f} | {gbs:6.0f}  err {err:.1e}  {best_cfg}",
                      flush=True)
                rows.append(dict(preset=preset, op=name, n=n, k=k, m=m, unfused_us=t_unf,
                                 cublas_us=t_cub, fused_us=t_fus, best_us=best,
                                 best_cfg=str(best_cfg), rel_err=err,
                                 pick=fused_linear.pick_config(m, n, k)))
    tot = {}
    for r in rows:
        key = (r["preset"], r["m"])
        t = tot.setdefault(key, [0.0, 0.0, 0.0])
        t[0] += r["unfused_us"]
        t[1] += r["fused_us"]
        t[2] += r["best_us"]
    print("per layer (us): preset, M, unfused, fused, best")
    for (p, m), (u, f, b) in tot.items():
        print(f"  {p:15} {m:3} {u:8.1f} {f:8.1f} {b:8.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
