"""Decode linears on the GPU: the Triton GEMV (``kernels/triton/gemv.py``) against cuBLAS.

    PYTHONPATH=src python3 bench/gpu_gemv_tune.py [--sweep] [--json OUT.json]
    PYTHONPATH=src python3 bench/gpu_gemv_tune.py --rows 1,2,4,6,8,16

1. Checks the GEMV (every prologue, bias, in-place residual, the gated epilogue, persistent
   programs) against ``reference`` in bf16.
2. ``--sweep``: per weight shape of the three-models presets, times every tile config inside a
   CUDA graph of back-to-back calls on distinct weight copies (so no call reads another's weights
   from L2), next to cuBLAS (``F.linear``); prints the best configs.
3. Times a whole decode layer stack of linears per preset (qkv with RMSNorm, o with the residual
   add, gate_up with RMSNorm and SiLU-and-mul, down with the add; every layer its own weights) as
   cuBLAS composites, GEMV without PDL, GEMV streaming every row in chunks with PDL, and the GEMV
   as ``pick_config`` sets it up (whole rows loaded before the PDL wait, persistent programs for
   the tall ones) with PDL.
   Roofline: the weight bytes over the measured copy bandwidth (read + write bytes per second).
4. ``--rows``: only the layer stacks of ``--models`` (default TinyLlama, Qwen2.5-3B) at several
   row counts: cuBLAS composites, the GEMV, and what ``linears`` routes to (where
   ``GEMV_MAX_ROWS`` belongs).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
import triton

from modelhive.kernels import reference
from modelhive.kernels.triton import linears
from modelhive.kernels.triton.gemv import FULL_K_MAX, gemv, pick_config

DT = torch.bfloat16
# (hidden, q_size, kv_size, intermediate, layers, vocab)
PRESETS = {
    "qwen2.5-0.5b": (896, 896, 128, 4864, 24, 151936),
    "tinyllama-1.1b": (2048, 2048, 256, 5632, 22, 32000),
    "qwen2.5-3b": (2048, 2048, 256, 11008, 36, 151936),
    "yi-6b": (4096, 4096, 512, 11008, 32, 64000),
}


def copy_bandwidth() -> float:
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(20):
        b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 20 / (s.elapsed_time(e) / 1e3)


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of ``fn`` replayed in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(True), torch.cuda.Event(True)
    st.record()
    for _ in range(reps):
        g.replay()
    en.record()
    torch.cuda.synchronize()
    return st.elapsed_time(en) / 1e3 / reps


def check() -> list[str]:
    torch.manual_seed(0)
    bad = []
    for m, n, k in [(1, 2560, 2048), (2, 2048, 5632), (4, 1000, 1536), (3, 77, 96)]:
        x = torch.randn(m, k, device="cuda", dtype=DT)
        w = torch.randn(n, k, device="cuda", dtype=DT) / k ** 0.5
        b = torch.randn(n, device="cuda", dtype=DT)
        nw = torch.randn(k, device="cuda", dtype=DT)
        res = torch.randn(m, n, device="cuda", dtype=DT)
        cases = {
            "plain+bias": (gemv(x, w, b), F.linear(x, w, b)),
            "rmsnorm": (gemv(x, w, prologue="rmsnorm", norm_weight=nw, eps=1e-6, offset=1.0),
                        reference.norm_linear(x, nw, 1e-6, 1.0, w)),
        }
        r2 = res.clone()
        cases["inplace"] = (gemv(x, w, residual=r2, out=r2), torch.addmm(res, x, w.t()))
        if n % 2 == 0:
            cases["gated"] = (gemv(x, w, prologue="rmsnorm", norm_weight=nw, eps=1e-6, act="silu"),
                              reference.norm_linear_act(x, nw, 1e-6, 0.0, w, "silu"))
        if triton.next_power_of_2(k) <= FULL_K_MAX:
            cfg = dict(BLOCK_N=2, BLOCK_K=triton.next_power_of_2(k), FULL_K=True, num_warps=4,
                       num_stages=1, PERSIST=1)
            cases["persist"] = (gemv(x, w, b, config=cfg), F.linear(x, w, b))
        for name, (got, want) in cases.items():
            err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
            ok = err < 2e-2
            print(f"check m={m} n={n} k={k} {name:10s} rel err {err:.2e} {'ok' if ok else 'FAIL'}")
            if not ok:
                bad.append(f"{m},{n},{k},{name}")
    return bad


def roles() -> list[tuple[str, int, int, str | None, bool, str | None]]:
    """(role, N, K, prologue, residual, act) of every distinct decode linear of the presets: the
    gate_up with RMSNorm before and the gated activation after, the down a plain stream plus
    the residual."""
    out = []
    for h, q, kv, inter, _, vocab in PRESETS.values():
        for r in [("qkv", q + 2 * kv, h, "rmsnorm", False, None), ("o", h, q, None, True, None),
                  ("gate_up", 2 * inter, h, "rmsnorm", False, "silu"),
                  ("down", h, inter, None, True, None), ("lm_head", vocab, h, None, False, None)]:
            if r[1:3] not in [o[1:3] for o in out if o[0] == r[0]]:
                out.append(r)
    return out


def sweep(results: dict, only: set[str] | None = None) -> None:
    for role, n, k, prologue, has_res, act in roles():
        if only and role not in only:
            continue
        k_pad = triton.next_power_of_2(k)
        configs = [dict(BLOCK_N=bn, BLOCK_K=bk, FULL_K=False, num_warps=nw, num_stages=1)
                   for bn, bk, nw in itertools.product([2, 4, 8, 16], [512, 1024], [4, 8])]
        if k_pad <= FULL_K_MAX:
            configs += [dict(BLOCK_N=bn, BLOCK_K=k_pad, FULL_K=True, num_warps=nw, num_stages=1,
                             PERSIST=per)
                        for bn, nw, per in itertools.product([1, 2, 4, 8, 16], [4, 8], [0, 2, 4, 8])]
        if act:  # a program reads BLOCK_N gate rows and BLOCK_N up rows
            configs = [c for c in configs if c["BLOCK_N"] <= 8]
        nbytes = n * k * 2
        copies = max(2, min(32, -(-(256 << 20) // nbytes)))
        ws = [torch.randn(n, k, device="cuda", dtype=DT) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=DT)
        nw_ = torch.ones(k, device="cuda", dtype=DT)
        n_out = n // 2 if act else n
        res = torch.randn(1, n_out, device="cuda", dtype=DT)
        outs = res if has_res else torch.empty(1, n_out, device="cuda", dtype=DT)
        kw = dict(prologue=prologue, norm_weight=nw_ if prologue == "rmsnorm" else None,
                  eps=1e-6, residual=res if has_res else None, out=outs, act=act)

        def cublas(ws=ws, x=x, prologue=prologue, nw_=nw_, res=res, has_res=has_res, outs=outs,
                   act=act):
            for w in ws:
                if prologue == "rmsnorm":
                    y = linears.F.linear(linears.rms_norm(x, nw_, 1e-6, 0.0), w)
                    if act:
                        linears.silu_and_mul(y)
                elif has_res:
                    res.addmm_(x, w.t())
                else:
                    torch.mm(x, w.t(), out=outs)

        t_cublas = graph_time(cublas) / copies
        rows = []
        for cfg in configs:
            try:
                t = graph_time(lambda ws=ws, x=x, kw=kw, cfg=cfg: [
                    gemv(x, w, config=dict(cfg), **kw) for w in ws]) / copies
            except Exception as exc:  # a config that does not compile (registers): skip it
                print(f"  {n}x{k} {cfg}: {type(exc).__name__}")
                continue
            rows.append((t, cfg))
        rows.sort(key=lambda r: r[0])
        t_pick = graph_time(lambda ws=ws, x=x, kw=kw: [gemv(x, w, **kw) for w in ws]) / copies
        short = lambda c: (c["BLOCK_N"], c["BLOCK_K"], c["num_warps"],  # noqa: E731
                           f"F{c.get('PERSIST', 0)}" if c["FULL_K"] else "L")
        pick = pick_config(n, k, prologue, gated=act is not None)
        print(f"{role:8s} {n:6d}x{k:5d} {nbytes / 2**20:6.1f} MiB  cuBLAS {t_cublas * 1e6:6.1f} | "
              f"pick {t_pick * 1e6:6.1f} {short(pick)} | best "
              + ", ".join(f"{t * 1e6:.1f} {short(c)}" for t, c in rows[:5]))
        results.setdefault("sweep", []).append({
            "role": role, "n": n, "k": k, "cublas_us": t_cublas * 1e6, "pick_us": t_pick * 1e6,
            "top": [{"us": t * 1e6, **cfg} for t, cfg in rows[:12]]})


def stack_weights(name: str) -> tuple[list[dict], int]:
    """Every layer's own linears (and norm weights) of a preset, and their weight bytes."""
    h, q, kv, inter, layers, _ = PRESETS[name]
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=DT) / s[-1] ** 0.5  # noqa: E731
    W = [dict(qkv=mk(q + 2 * kv, h), o=mk(h, q), gu=mk(2 * inter, h), down=mk(h, inter),
              n1=torch.ones(h, device="cuda", dtype=DT), n2=torch.ones(h, device="cuda", dtype=DT))
         for _ in range(layers)]
    return W, sum(w[k].numel() * 2 for w in W for k in ("qkv", "o", "gu", "down"))


def cublas_stack(W: list[dict], q: int, state: torch.Tensor) -> None:
    """The layer stack as cuBLAS composites: RMSNorm, linear, addmm with the residual."""
    for w in W:
        qkv = F.linear(linears.rms_norm(state, w["n1"], 1e-6, 0.0), w["qkv"])
        state.addmm_(qkv[:, :q], w["o"].t())
        gu = F.linear(linears.rms_norm(state, w["n2"], 1e-6, 0.0), w["gu"])
        state.addmm_(linears.silu_and_mul(gu), w["down"].t())


def layer_stack(name: str, results: dict, bw: float) -> None:
    h, q = PRESETS[name][:2]
    torch.manual_seed(1)
    W, nbytes = stack_weights(name)
    h0 = torch.randn(1, h, device="cuda", dtype=DT)
    state = h0.clone()

    def cublas():
        cublas_stack(W, q, state)

    def fused(use_pdl: bool, full_k: bool = True):
        def cfg(weight, prologue=None, act=None):
            c = {**pick_config(*weight.shape, prologue, gated=act is not None), "pdl": use_pdl}
            if not full_k:
                c.update(BLOCK_N=4 if act is None else 2, BLOCK_K=1024, FULL_K=False,
                         num_warps=8 if weight.shape[0] <= 2048 else 4)
            return c

        def run():
            hs = state
            for w in W:
                qkv = gemv(hs, w["qkv"], prologue="rmsnorm", norm_weight=w["n1"], eps=1e-6,
                           config=cfg(w["qkv"], "rmsnorm"))
                gemv(qkv[:, :q], w["o"], residual=hs, out=hs, config=cfg(w["o"]))
                a = gemv(hs, w["gu"], prologue="rmsnorm", norm_weight=w["n2"], eps=1e-6,
                         act="silu", config=cfg(w["gu"], "rmsnorm", "silu"))
                gemv(a, w["down"], residual=hs, out=hs, config=cfg(w["down"]))
        return run

    row = {"model": name, "weights_mb": nbytes / 1e6, "roofline_us": nbytes / bw * 1e6}
    variants = [("cublas", cublas), ("gemv", fused(False)), ("loop+pdl", fused(True, False)),
                ("gemv+pdl", fused(True))]
    for label, fn in variants:
        state.copy_(h0)
        t = graph_time(fn, reps=10)
        row[label + "_us"] = t * 1e6
    # same result? (one pass each from the same start)
    outs = {}
    for label, fn in [("cublas", cublas), ("gemv+pdl", fused(True))]:
        state.copy_(h0)
        fn()
        outs[label] = state.float().clone()
    row["max_rel_diff"] = ((outs["cublas"] - outs["gemv+pdl"]).abs().max()
                           / outs["cublas"].abs().max()).item()
    print(f"{name:15s} linears {nbytes / 1e9:5.2f} GB  roofline {row['roofline_us']:7.0f} us | "
          + " | ".join(f"{lab} {row[lab + '_us']:6.0f} us ({row['roofline_us'] / row[lab + '_us'] * 100:4.1f} %)"
                       for lab, _ in variants)
          + f" | rel diff {row['max_rel_diff']:.1e}")
    results.setdefault("layers", []).append(row)


def rows_sweep(rows: list[int], bw: float, models: list[str]) -> None:
    """The layer stacks of ``models`` at ``rows`` rows: cuBLAS composites against the GEMV and
    against whatever ``linears`` routes it to, to place ``GEMV_MAX_ROWS``."""
    for name in models:
        h, q = PRESETS[name][:2]
        W, nbytes = stack_weights(name)
        for m in rows:
            state = torch.randn(m, h, device="cuda", dtype=DT)

            def cublas(state=state, W=W, q=q):
                cublas_stack(W, q, state)

            def run_gemv(state=state, W=W, q=q):
                for w in W:
                    qkv = gemv(state, w["qkv"], prologue="rmsnorm", norm_weight=w["n1"], eps=1e-6)
                    gemv(qkv[:, :q], w["o"], residual=state, out=state)
                    a = gemv(state, w["gu"], prologue="rmsnorm", norm_weight=w["n2"], eps=1e-6,
                             act="silu")
                    gemv(a, w["down"], residual=state, out=state)

            def routed(state=state, W=W, q=q):  # what the model's ops run at this many rows
                for w in W:
                    qkv = linears.norm_linear(state, w["n1"], 1e-6, 0.0, w["qkv"])
                    linears.linear_add(qkv[:, :q], w["o"], state)
                    a = linears.norm_linear_act(state, w["n2"], 1e-6, 0.0, w["gu"], "silu")
                    linears.linear_add(a, w["down"], state)

            tc, tg = graph_time(cublas, reps=10) * 1e6, graph_time(run_gemv, reps=10) * 1e6
            tr = graph_time(routed, reps=10) * 1e6
            print(f"{name:15s} rows {m:3d}  roofline {nbytes / bw * 1e6:6.0f} us  "
                  f"cuBLAS {tc:6.0f} us  GEMV {tg:6.0f} us  linears (routed) {tr:6.0f} us")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--roles", help="comma-separated roles to sweep (default: all)")
    ap.add_argument("--rows", help="comma-separated row counts: layer stacks, GEMV vs cuBLAS")
    ap.add_argument("--models", default="tinyllama-1.1b,qwen2.5-3b",
                    help="with --rows: comma-separated presets")
    ap.add_argument("--json")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    results: dict = {"device": torch.cuda.get_device_name(), "copy_tbs": bw / 1e12}
    if args.rows:
        rows_sweep([int(r) for r in args.rows.split(",")], bw, args.models.split(","))
        return
    results["check_failures"] = check()
    for name in list(PRESETS)[1:]:  # the three-models presets
        layer_stack(name, results, bw)
    if args.sweep:
        sweep(results, set(args.roles.split(",")) if args.roles else None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
