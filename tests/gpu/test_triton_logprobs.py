"""The Triton logprobs (``kernels/triton/logprobs.py``) against their reference, the sampler's
torch path (``engine/sampler._logprobs``: float32 log-softmax, gather, topk), on fresh random
inputs: the chosen tokens' logprobs and the k largest within float32 rounding, the alternatives'
ids those of their values, for float32, bf16 and fp16 logits, 1-300 rows, vocabularies from
a few hundred to Gemma's 262,144 and k from 0 to 20; ties at the top (the smallest id first);
a strided logits view; no new compile for another row count, k or alignment; and an engine's
logprobs and prompt logprobs through the kernel equal to the torch path's. Runs on CUDA, or on
the CPU under ``TRITON_INTERPRET=1`` (not the bf16 cases).
"""

from __future__ import annotations

import pytest
import torch

from modelhive.engine import sampler
from modelhive.engine.sequence import ScheduledSeq
from modelhive.sampling_params import SamplingParams
from tests.gpu.kernel_checks import DEVICE, compiled_variants, needs_gpu_numerics

# after kernel_checks, which skips this module without CUDA or Triton
kernel = pytest.importorskip("modelhive.kernels.triton.logprobs")

#: against float64 truth: a few float32 ulps of logprobs ~10-30 in magnitude
ATOL = 2e-5
#: against the torch path, whose float32 sums over the vocabulary (on the CPU, in long sequential
#: runs) carry their own rounding: measured up to 4.6e-5 at 151,936 logits
REF_ATOL = 1.5e-4


def check(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    got = kernel.logprobs(logits, tokens, k)
    want = sampler._logprobs(logits, tokens, k)
    truth = torch.log_softmax(logits.double(), dim=-1)
    assert len(got) == len(want) == (2 if k else 0) + 1
    torch.testing.assert_close(got[0], truth.gather(1, tokens[:, None])[:, 0].float(),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(got[0], want[0], atol=REF_ATOL, rtol=0)
    if k:
        vals, ids = got[1], got[2]
        assert vals.shape == ids.shape == (logits.shape[0], k) and ids.dtype == torch.int64
        torch.testing.assert_close(vals, torch.topk(truth, k, dim=-1).values.float(),
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(vals, want[1], atol=REF_ATOL, rtol=0)
        # each id is its value's (equal values may come in another order than torch's), no
        # id twice, in descending order
        torch.testing.assert_close(truth.gather(1, ids).float(), vals, atol=ATOL, rtol=0)
        assert bool((vals[:, :-1] >= vals[:, 1:]).all())
        assert all(len(set(r)) == k for r in ids.tolist())
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("rows,vocab,k", [(1, 300, 20), (7, 4096, 1), (3, 4097, 5),
                                          (40, 32000, 0), (232, 151936, 1), (300, 151936, 5),
                                          (16, 151936, 20), (5, 262144, 3)])
def test_kernel_matches_the_torch_path(rows, vocab, k, dtype):
    needs_gpu_numerics(dtype)
    gen = torch.Generator().manual_seed(rows * vocab + k)
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(dtype).to(DEVICE)
    tokens = torch.randint(0, vocab, (rows,), generator=gen).to(DEVICE)
    check(logits, tokens, k)


def test_ties_take_the_smallest_id_first():
    """Equal values at the top, within a chunk and across chunks: the smallest id first."""
    needs_gpu_numerics()
    vocab = 3 * kernel.CHUNK + 11
    logits = torch.zeros(2, vocab)
    logits[0, [5, 9000, 70, vocab - 1]] = 7.0
    logits[1, [kernel.CHUNK, 3]] = 2.0
    logits[1, 4] = 9.0
    _, vals, ids = check(logits.to(DEVICE), torch.tensor([70, 4]).to(DEVICE), 4)
    assert ids[0].tolist() == [5, 70, 9000, vocab - 1]
    assert ids[1].tolist()[:3] == [4, 3, kernel.CHUNK]
    assert vals[0, 0] == vals[0, 3]


def test_strided_view_and_the_sampler_dispatch():
    """A row-strided logits view (the shared logits buffer's rows), through
    ``sampler.logprobs``, which takes the kernel on CUDA and the largest k any row asks for."""
    needs_gpu_numerics()
    wide = torch.randn(9, 5000 + 64, device=DEVICE) * 3
    logits = wide[:, 32:32 + 5000]
    tokens = torch.arange(9, device=DEVICE) * 7
    items = [ScheduledSeq(f"s{r}", (1,), 0, (0,), True, SamplingParams(logprobs=[None, 0, 6][r % 3]),
                          0, (), 0) for r in range(9)]
    got = sampler.logprobs(logits, tokens, items)
    want = sampler._logprobs(logits.contiguous(), tokens, 6)
    torch.testing.assert_close(got[0], want[0], atol=REF_ATOL, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=REF_ATOL, rtol=0)


def test_new_row_counts_k_and_alignments_compile_nothing_new():
    """Another row count, k or pointer alignment runs the variant already compiled (per logits
    dtype and vocabulary): a compile in the middle of serving stalls every stream."""
    needs_gpu_numerics()
    vocab = 2000
    wide = torch.randn(64, vocab + 40, device=DEVICE)
    spare = torch.randint(0, vocab, (128,), device=DEVICE)
    check(wide[:5, :vocab], spare[:5], 2)
    before = (compiled_variants(kernel._chunk_kernel), compiled_variants(kernel._row_kernel))
    for rows, k, offset in [(1, 0, 0), (16, 1, 3), (17, 20, 0), (64, 16, 40), (2, 5, 7)]:
        check(wide[:rows, offset:offset + vocab], spare[offset:offset + rows], k)
    assert (compiled_variants(kernel._chunk_kernel),
            compiled_variants(kernel._row_kernel)) == before


def test_bad_arguments_are_refused():
    needs_gpu_numerics()
    logits = torch.randn(2, 50, device=DEVICE)
    tokens = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError):
        kernel.logprobs(logits, tokens, 21)
    with pytest.raises(ValueError):
        kernel.logprobs(logits.t(), tokens, 1)
    assert kernel.logprobs(logits[:0], tokens[:0], 3)[1].shape == (0, 3)


def engine_logprobs(kernel_on: bool, monkeypatch) -> tuple[list, list, list]:
    """A greedy request with logprobs and prompt logprobs through an engine on ``DEVICE``, the
    logprobs (decode and prompt scoring) by the kernel or by the torch path."""
    from modelhive import ModelSpec
    from modelhive.engine.hive import build_engine
    from modelhive.kernels import ops

    monkeypatch.setattr(ops, "logprobs_kernel",
                        (lambda _: kernel.logprobs) if kernel_on else (lambda _: None))
    spec = ModelSpec(name="m", source="preset:tiny-llama", dtype="float32", max_model_len=128,
                     max_num_seqs=4)
    engine = build_engine([spec], device=DEVICE, memory="3GiB" if DEVICE == "cuda" else "1GiB",
                          enforce_eager=True, measure_memory=False)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2)
    engine.add_request("m", list(range(10, 40)), params, request_id="r")
    deltas = []
    while engine.has_work:
        deltas += engine.step()
    assert not [d.error for d in deltas if d.error]

    def flat(records):
        return [(r.token_id, r.logprob, [(i, v) for i, _, v in r.top]) for r in records]

    return ([t for d in deltas for t in d.token_ids],
            flat(r for d in deltas for r in (d.logprobs or ())),
            flat(r for d in deltas for r in (d.prompt_logprobs or ())))


def test_engine_logprobs_and_prompt_logprobs_through_the_kernel(monkeypatch):
    """The runner's two users of the kernel (a step's logprobs, prompt scoring) give the torch
    path's tokens, logprobs and alternatives."""
    got = engine_logprobs(True, monkeypatch)
    want = engine_logprobs(False, monkeypatch)
    assert got[0] == want[0] and len(got[0]) == 5
    for a, b in ((got[1], want[1]), (got[2], want[2])):
        assert len(a) == len(b) > 0
        for (t1, l1, top1), (t2, l2, top2) in zip(a, b, strict=True):
            assert t1 == t2 and abs(l1 - l2) < REF_ATOL
            assert [i for i, _ in top1] == [i for i, _ in top2]
            assert all(abs(u - v) < REF_ATOL for (_, u), (_, v) in zip(top1, top2, strict=True))
