"""The Triton linears (the GEMV up to ``GEMV_MAX_ROWS`` rows, the cuBLAS routes above it) and the
greedy argmax against their plain-PyTorch references on fresh random inputs; outputs are poisoned
(NaN) before the kernels run. Runs on CUDA; skipped without it (``TRITON_INTERPRET=1``: on the
CPU through Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

from modelhive.kernels import reference
from tests.gpu.kernel_checks import (
    DEVICE,
    DTYPES,
    INTERPRET,
    TOL,
    needs_gpu_numerics,
    poison_allocator,
    rel_err,
)

# after kernel_checks, which skips this module without CUDA or Triton
tk = pytest.importorskip("modelhive.kernels.triton")


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows,vocab", [(1, 32000), (2, 151936), (5, 2049), (3, 7), (64, 50000)])
def test_argmax_is_the_first_maximum(dtype_name, rows, vocab):
    dtype = DTYPES[dtype_name]
    x = torch.randn(rows, vocab, device=DEVICE).to(dtype)
    ties = torch.randint(0, 3, (rows, vocab), device=DEVICE).to(dtype)  # maxima in every chunk
    flat = torch.full((rows, vocab), float("-inf"), device=DEVICE).to(dtype)
    for logits in (x, ties, flat, x[:, : vocab // 2 + 1]):  # the last: rows with a stride
        got = tk.argmax(logits)
        assert got.dtype == torch.int64
        assert got.tolist() == reference.argmax(logits).tolist()
        out = torch.full((rows,), -1, dtype=torch.int64, device=DEVICE)
        assert tk.argmax(logits, out) is out and out.tolist() == got.tolist()


LINEAR_SHAPES = [(2560, 2048), (96, 40), (2048, 5632), (200, 72), (8200, 256)]


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 16, 17, 40, 64, 65, 150])
@pytest.mark.parametrize("op", ["norm_linear", "norm_linear_bias", "linear_add", "norm_silu",
                                "norm_gelu_tanh"])
def test_fused_linears(dtype_name, m, op):
    """The GEMV with fused prologue/epilogue (up to ``GEMV_MAX_ROWS`` rows), the RMSNorm kernel +
    the swap-AB stream (bf16, up to ``SKINNY_ROWS`` rows; down-shaped weights: cuBLAS) and
    RMSNorm + cuBLAS (+ act-and-mul), addmm (residual in cuBLAS's epilogue) above, against the
    reference composition. ``norm_*``:
    RMSNorm + a fused gate_up ``[2I, K]`` + the gated activation (in the GEMV's epilogue)."""
    dtype = DTYPES[dtype_name]
    needs_gpu_numerics(dtype, libdevice=op.endswith("gelu_tanh"))
    shapes = LINEAR_SHAPES[1::2] if INTERPRET else LINEAR_SHAPES
    for n, k in shapes:
        weight = torch.randn(n, k, dtype=dtype, device=DEVICE) / k ** 0.5
        if op.startswith("norm_") and not op.startswith("norm_linear"):
            x = torch.randn(m, k, dtype=dtype, device=DEVICE) * 3
            norm_w = torch.randn(k, dtype=dtype, device=DEVICE)
            args = (x, norm_w, 1e-6, 0.5, weight, op[len("norm_"):])
            ref = reference.norm_linear_act(*args)
            poison_allocator()
            out = tk.norm_linear_act(*args)
            n //= 2
        elif op.startswith("norm_linear"):
            x = torch.randn(m, k, dtype=dtype, device=DEVICE) * 3
            norm_w = torch.randn(k, dtype=dtype, device=DEVICE)
            bias = torch.randn(n, dtype=dtype, device=DEVICE) if op.endswith("bias") else None
            offset = 1.0 if n == 96 else 0.0
            args = (x, norm_w, 1e-6, offset, weight, bias)
            ref = reference.norm_linear(*args)
            poison_allocator()
            out = tk.norm_linear(*args)
        else:
            x = torch.randn(m, k, dtype=dtype, device=DEVICE)
            res = torch.randn(m, n, dtype=dtype, device=DEVICE)
            ref = reference.linear_add(x, weight, res)
            poison_allocator()
            out = tk.linear_add(x, weight, res)
        assert out.shape == (m, n)
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2), (n, k)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_gemv_strided_input_and_float32_logits(dtype_name):
    """A row-strided input (q of a fused qkv output) and a float32 output buffer (logits: the
    product rounded to the model dtype first, as ``linear(...).float()`` is)."""
    from modelhive.kernels.triton.gemv import gemv

    dtype = DTYPES[dtype_name]
    needs_gpu_numerics(dtype)
    for m in (1, 4):
        qkv = torch.randn(m, 320, dtype=dtype, device=DEVICE)
        x = qkv[:, :192]
        weight = torch.randn(130, 192, dtype=dtype, device=DEVICE) / 192 ** 0.5
        out = torch.full((m, 130), float("nan"), dtype=torch.float32, device=DEVICE)
        gemv(x, weight, out=out)
        ref = reference.linear(x.contiguous(), weight).float()
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_gemv_persistent_programs(dtype_name):
    """A grid smaller than the tiles (``PERSIST``): every program loops over several tiles of
    whole rows, its prologue computed once, the next tile loading while one reduces."""
    from modelhive.kernels.triton.gemv import gemv

    dtype = DTYPES[dtype_name]
    needs_gpu_numerics(dtype)
    cfg = dict(BLOCK_N=4, BLOCK_K=256, FULL_K=True, num_warps=4, num_stages=1, PERSIST=1)
    for m in (1, 3):
        x = torch.randn(m, 200, dtype=dtype, device=DEVICE)
        weight = torch.randn(3002, 200, dtype=dtype, device=DEVICE) / 200 ** 0.5
        norm_w = torch.randn(200, dtype=dtype, device=DEVICE)
        got = gemv(x, weight, prologue="rmsnorm", norm_weight=norm_w, eps=1e-6, act="silu",
                   config=dict(cfg))
        want = reference.norm_linear_act(x, norm_w, 1e-6, 0.0, weight, "silu")
        assert got.shape == (m, 1501) and rel_err(got, want) < TOL[dtype]
        res = torch.randn(m, 3002, dtype=dtype, device=DEVICE)
        got = gemv(x, weight, residual=res.clone(), config=dict(cfg))
        assert rel_err(got, reference.linear_add(x, weight, res.clone())) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [3, 16, 31, 64, 150])
def test_skinny_linear(dtype, m):
    """The swap-AB stream (``skinny_gemm.py``) alone, on shapes that are not multiples of its
    tiles and on the tall gated config, one and several row tiles (150 rows: three): bias,
    residual in place, both gated activations, a row-strided input."""
    from modelhive.kernels.triton.skinny_gemm import skinny_linear

    needs_gpu_numerics(torch.bfloat16)
    torch.manual_seed(m)
    for n, k in [(200, 72), (2560, 2048), (96, 1000), (2 * 8200, 4096)]:
        weight = torch.randn(n, k, dtype=dtype, device=DEVICE) / k ** 0.5
        qkv = torch.randn(m, k + 24, dtype=dtype, device=DEVICE)
        x = qkv[:, :k]  # rows with a stride
        bias = torch.randn(n, dtype=dtype, device=DEVICE)
        poison_allocator()
        assert rel_err(skinny_linear(x, weight, bias),
                       reference.linear(x.contiguous(), weight, bias)) < 1e-2, (n, k)
        res = torch.randn(m, n, dtype=dtype, device=DEVICE)
        want = reference.linear_add(x.contiguous(), weight, res.clone())
        got = skinny_linear(x, weight, residual=res, out=res)
        assert got is res and rel_err(got, want) < 1e-2, (n, k)
        for act, ref_act in (("silu", reference.silu_and_mul),
                             ("gelu_tanh", reference.gelu_tanh_and_mul)):
            want = ref_act(reference.linear(x.contiguous(), weight, bias))
            poison_allocator()
            got = skinny_linear(x, weight, bias, act=act)
            assert got.shape == (m, n // 2) and rel_err(got, want) < 1e-2, (n, k, act)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("split", [2, 3, 4])
def test_skinny_linear_split_k(dtype, split):
    """Split-K in the swap-AB stream: each tile's partials summed by its last split in split
    order (the same bits on every call, whatever order the splits finish in), the tile counters
    back at zero after every call; bias, residual in place, splits of unequal length."""
    from modelhive.kernels.triton.skinny_gemm import _workspace, pick_config, skinny_linear

    needs_gpu_numerics(dtype)
    torch.manual_seed(split)
    shapes = [(200, 1000)] if INTERPRET else [(200, 1000), (2560, 2048), (2048, 2048)]
    for m in (3, 32):
        for n, k in shapes:
            weight = torch.randn(n, k, dtype=dtype, device=DEVICE) / k ** 0.5
            x = torch.randn(m, k, dtype=dtype, device=DEVICE)
            bias = torch.randn(n, dtype=dtype, device=DEVICE)
            cfg = pick_config(m, n, k, False) | {"SPLIT_K": split}
            want = reference.linear(x, weight, bias)
            poison_allocator()
            first = skinny_linear(x, weight, bias, config=dict(cfg))
            again = skinny_linear(x, weight, bias, config=dict(cfg))
            assert rel_err(first, want) < 1e-2 and torch.equal(first, again), (m, n, k)
            res = torch.randn(m, n, dtype=dtype, device=DEVICE)
            want = reference.linear_add(x, weight, res.clone())
            got = skinny_linear(x, weight, residual=res, out=res, config=dict(cfg))
            assert got is res and rel_err(got, want) < 1e-2, (m, n, k)
    assert _workspace(x.device)[1].count_nonzero().item() == 0


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs and PDL need the GPU")
@pytest.mark.parametrize("rows", [1, 8])
def test_gemv_chain_in_cuda_graph_matches_reference(rows):
    """Eight layers of dependent linears (norm+qkv, o + residual in place, norm+gate_up+act,
    down + residual in place) captured in one CUDA graph and replayed: with PDL each kernel starts
    before the previous one ends, so a missing wait would read stale activations here. One row:
    the GEMV; eight: the RMSNorm kernel, the swap-AB stream and cuBLAS (down)."""
    torch.manual_seed(3)
    dtype, h, inter, layers = torch.bfloat16, 512, 1408, 8
    mk = lambda *s: torch.randn(*s, dtype=dtype, device=DEVICE) / s[-1] ** 0.5  # noqa: E731
    W = [(mk(3 * h, h), mk(h, h), mk(2 * inter, h), mk(h, inter),
          1 + 0.1 * torch.randn(h, dtype=dtype, device=DEVICE)) for _ in range(layers)]

    def run(ops, hs):
        for qkv_w, o_w, gu_w, down_w, nw in W:
            qkv = ops.norm_linear(hs, nw, 1e-6, 0.0, qkv_w)
            hs = ops.linear_add(qkv[:, :h], o_w, hs)
            act = ops.norm_linear_act(hs, nw, 1e-6, 0.0, gu_w, "silu")
            hs = ops.linear_add(act, down_w, hs)
        return hs

    start = torch.randn(rows, h, dtype=dtype, device=DEVICE)
    want = run(reference, start.clone())
    state = start.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run(tk, state.clone())
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = run(tk, state)
    for _ in range(3):
        state.copy_(start)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(got.float(), want.float()) < 2e-2
