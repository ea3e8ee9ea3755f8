"""DecodeAhead's contract, on a fake graph whose logits pick ``input id + 1`` (and, for
multi-step launches, ``input id + k + 1`` at step k)."""

from __future__ import annotations

import numpy as np
import torch

from modelhive.engine.sampler import logprobs, sample
from modelhive.engine.sequence import ScheduledSeq
from modelhive.runner.decode_ahead import DecodeAhead, can_run_ahead
from modelhive.sampling_params import SamplingParams

VOCAB = 50
GREEDY = SamplingParams(max_tokens=100, temperature=0.0)


class FakeGraphs:
    max_batch = 8
    tokens_per_block = 4

    def __init__(self, steps: int = 1):
        self.steps = steps
        self.replays: list[list[tuple]] = []
        self.multi: list[list[tuple]] = []  # the multi-step replays' (token, position) rows

    def fits(self, rows):
        return len(rows) <= self.max_batch

    def fits_steps(self, rows):  # as DecodeGraphs: every step of every row has its slot
        T, S = self.tokens_per_block, self.steps
        return S > 1 and self.fits(rows) and all(p + S <= len(t) * T for _, p, t in rows)

    def replay_steps(self, rows, input_ids):
        self.multi.append([(int(t), p) for t, (_, p, _) in zip(input_ids, rows, strict=True)])
        return torch.stack([(input_ids + k + 1) % VOCAB for k in range(self.steps)])

    def replay(self, rows, input_ids=None):
        self.replays.append([(int(t), p) for t, (_, p, _) in zip(input_ids, rows, strict=True)])
        logits = torch.nn.functional.one_hot((input_ids + 1) % VOCAB, VOCAB).float()
        return logits, logits.argmax(-1)


def seq(seq_id: str, token: int, pos: int, blocks: int = 4, params=GREEDY, generated: int = 3):
    return ScheduledSeq(seq_id, (token,), pos, tuple(range(blocks)), True, params, generated)


def test_launches_the_next_step_on_device_tokens_and_hands_it_over():
    graphs = FakeGraphs()
    ahead = DecodeAhead(graphs, max_model_len=64)
    step = [seq("a", 7, 5), seq("b", 9, 6)]
    out = ahead.finish(step, torch.tensor([11, 20]))
    assert [(t.seq_id, t.token_id) for t in out] == [("a", 11), ("b", 20)]
    assert graphs.replays == [[(11, 6), (20, 7)]]  # fed the sampled tokens, positions + 1
    nxt = [seq("a", 11, 6), seq("b", 20, 7)]
    assert ahead.take(nxt)[0].tolist() == [12, 21]
    assert ahead.take(nxt) is None  # handed over once


def test_a_prompt_chunk_that_samples_launches_its_first_decode():
    graphs = FakeGraphs()
    ahead = DecodeAhead(graphs, max_model_len=64)
    prompt = ScheduledSeq("p", (4, 5, 6), 2, (0, 1), True, GREEDY, 0)  # positions 2..4
    out = ahead.finish([seq("a", 7, 5), prompt], torch.tensor([11, 30]))
    assert [t.token_id for t in out] == [11, 30]
    assert graphs.replays == [[(11, 6), (30, 5)]]
    assert ahead.take([seq("a", 11, 6), seq("p", 30, 5)])[0].tolist() == [12, 31]
    ahead.finish([ScheduledSeq("p", (4, 5), 2, (0, 1), True, GREEDY, 0)], torch.tensor([9]))
    assert ahead.take([ScheduledSeq("p", (9, 1), 4, (0, 1), True, GREEDY, 0)]) is None


def test_anything_but_that_step_or_part_of_it_drops_it():
    graphs = FakeGraphs()
    ahead = DecodeAhead(graphs, max_model_len=64)
    step = [seq("a", 7, 5), seq("b", 9, 6)]
    for other in ([seq("b", 20, 7), seq("a", 11, 6)],  # order changed
                  [seq("b", 20, 7), seq("a", 11, 6), seq("c", 3, 7)],  # ... and extended
                  [seq("a", 11, 6), seq("c", 3, 7)],  # another sequence, same length
                  [seq("a", 11, 6), seq("b", 20, 7), seq("c", 3, 7)],  # a new sequence after
                  [seq("c", 3, 7), seq("a", 11, 6), seq("b", 20, 7)],  # ... or before
                  [seq("a", 11, 6), seq("b", 20, 2)],  # b preempted and re-decoding elsewhere
                  [seq("b", 20, 2)]):  # ... and a finished
        ahead.finish(step, torch.tensor([11, 20]))
        assert ahead.take(other) is None
        assert ahead.take([seq("a", 11, 6), seq("b", 20, 7)]) is None  # dropped for good
    ahead.finish(step, torch.tensor([11, 20]))
    ahead.drop()
    assert ahead.take([seq("a", 11, 6), seq("b", 20, 7)]) is None
    assert ahead.used == 0


def test_a_sequence_that_ends_now_is_launched_with_the_others_unless_all_end():
    graphs = FakeGraphs()
    ahead = DecodeAhead(graphs, max_model_len=64)
    last = SamplingParams(max_tokens=4, temperature=0.0)
    for step in ([seq("a", 7, 5), seq("b", 9, 6, params=last, generated=3)],  # b's 4th token
                 [seq("b", 9, 6, params=last, generated=3), seq("a", 7, 5)],  # b first
                 [seq("a", 7, 5), seq("b", 9, 62, blocks=16)]):  # b at 63: the last of max_model_len
        ahead.finish(step, torch.tensor([1, 2]))
        assert graphs.replays[-1] == [(1, step[0].num_cached + 1), (2, step[1].num_cached + 1)]
        i = [s.seq_id for s in step].index("a")  # a continues (fed token i + 1)
        assert ahead.take([seq("a", i + 1, 6)])[0].tolist() == [i + 2]
    assert ahead.launched == 3
    for step in ([seq("b", 9, 6, params=last, generated=3)],
                 [seq("b", 9, 6, params=last, generated=3), seq("a", 7, 62, blocks=16)],  # all end
                 [seq("a", 7, 5), seq("b", 9, 15, blocks=4)],  # 16 needs a fifth block of 4
                 [seq("a", 7, 5), seq("b", 9, 15, params=last, blocks=4)],  # b ends, no slot
                 [seq("a", 7, 5), seq("b", 9, 63, blocks=17)]):  # a slot, but past max_model_len
        graphs.replays.clear()
        ahead.finish(step, torch.tensor([1] * len(step)))
        assert ahead.take([seq("a", 1, 6)]) is None
        assert graphs.replays == []
    assert ahead.launched == 3


def test_a_step_less_some_rows_takes_the_rows_it_keeps():
    graphs = FakeGraphs()
    ahead = DecodeAhead(graphs, max_model_len=64)
    last = SamplingParams(max_tokens=4, temperature=0.0)
    step = [seq("a", 7, 5), seq("b", 9, 6, params=last, generated=3), seq("c", 3, 8)]
    out = ahead.finish(step, torch.tensor([11, 20, 30]))
    assert [t.token_id for t in out] == [11, 20, 30]
    assert graphs.replays == [[(11, 6), (20, 7), (30, 9)]]
    nxt = [seq("a", 11, 6), seq("c", 30, 9)]  # b finished (max_tokens)
    assert ahead.take(nxt)[0].tolist() == [12, 31]
    assert ahead.used == 1
    for kept, expected in (([seq("c", 30, 9)], [31]),  # a finished too (EOS)
                           ([seq("a", 11, 6)], [12]),
                           ([seq("a", 11, 6), seq("b", 20, 7), seq("c", 30, 9)], [12, 21, 31])):
        ahead.finish(step, torch.tensor([11, 20, 30]))
        assert ahead.take(kept)[0].tolist() == expected
    assert ahead.used == 4
    for other in ([seq("c", 30, 9), seq("a", 11, 6)],  # reordered
                  [seq("a", 11, 6), seq("c", 30, 9), seq("d", 4, 2)],  # extended
                  [seq("d", 4, 2), seq("a", 11, 6), seq("c", 30, 9)],
                  [seq("a", 11, 6), seq("d", 4, 2), seq("c", 30, 9)],
                  [seq("a", 11, 6), seq("c", 30, 3)],  # c at another position
                  [seq("a", 11, 6), ScheduledSeq("c", (30, 1), 9, (0, 1, 2, 3), True,
                                                 GREEDY, 4)]):  # not a decode
        ahead.finish(step, torch.tensor([11, 20, 30]))
        assert ahead.take(other) is None
        assert ahead.take(nxt) is None  # dropped for good
    assert ahead.used == 4


def test_steps_in_which_every_row_samples_run_ahead():
    assert can_run_ahead([seq("a", 1, 3)])
    assert can_run_ahead([seq("a", 1, 3, params=SamplingParams(temperature=0.5, top_p=0.9))])
    assert not can_run_ahead([])
    assert can_run_ahead([seq("a", 1, 3, params=SamplingParams(temperature=0.0, logprobs=2))])
    assert can_run_ahead([ScheduledSeq("a", (1, 2), 3, (0,), True, GREEDY, 0)])  # last chunk
    assert not can_run_ahead([ScheduledSeq("a", (1, 2), 3, (0,), False, GREEDY, 0)])
    penalised = ScheduledSeq("a", (1,), 3, (0,), True, GREEDY, 0, history=(1, 2, 3, 1))
    assert can_run_ahead([penalised])  # the launch passes the unseen token (below)


def test_a_penalised_step_runs_ahead_one_step_counting_the_token_the_host_has_not_seen():
    """Greedy rows with a repetition or a presence penalty, on a fake graph whose logits favour
    the token it is fed (2.0) over the next one (1.5): the step launched ahead must count the
    fed token, which is in no history yet, and so pick the next one; and it must not be a
    multi-step launch (the graphs' argmax knows no penalties)."""

    class Graphs(FakeGraphs):
        def replay(self, rows, input_ids=None):
            super().replay(rows, input_ids)
            logits = torch.zeros(len(input_ids), VOCAB)
            logits.scatter_(1, input_ids[:, None], 2.0)
            logits.scatter_(1, ((input_ids + 1) % VOCAB)[:, None], 1.5)
            return logits, logits.argmax(-1)

    graphs = Graphs(steps=3)
    ahead = DecodeAhead(graphs, max_model_len=64)
    rep = SamplingParams(max_tokens=100, temperature=0.0, repetition_penalty=4.0)
    pres = SamplingParams(max_tokens=100, temperature=0.0, presence_penalty=1.0)
    step = [ScheduledSeq(name, (11,), 4, tuple(range(8)), True, params, 1,
                         history=np.array([1, 2, 3, 11]), num_prompt_tokens=3)
            for name, params in (("a", rep), ("b", pres))]
    ahead.finish(step, torch.tensor([20, 30]))  # sampled now, on the device
    assert graphs.multi == [] and graphs.replays == [[(20, 5), (30, 5)]]
    nxt = [ScheduledSeq(name, (tok,), 5, tuple(range(8)), True, params, 2,
                        history=np.array([1, 2, 3, 11, tok]), num_prompt_tokens=3)
           for name, tok, params in (("a", 20, rep), ("b", 30, pres))]
    assert ahead.take(nxt)[0].tolist() == [21, 31]  # 20 and 30 penalised: 0.5 and 1.0 < 1.5


def test_a_multi_step_launch_hands_out_its_steps_and_launches_the_next_at_the_first():
    graphs = FakeGraphs(steps=3)
    ahead = DecodeAhead(graphs, max_model_len=64)
    out = ahead.finish([seq("a", 7, 5, blocks=8), seq("b", 9, 6, blocks=8)], torch.tensor([11, 20]))
    assert [t.token_id for t in out] == [11, 20]
    assert graphs.multi == [[(11, 6), (20, 7)]] and graphs.replays == []
    # the first of its steps: the next launch starts after its last token (position 6 + 2)
    assert [t.token_id for t in ahead.step([seq("a", 11, 6, blocks=8),
                                            seq("b", 20, 7, blocks=8)])] == [12, 21]
    assert graphs.multi[1:] == [[(14, 9), (23, 10)]]
    # the later ones come from the host, with no replay; rows may drop out
    assert [t.token_id for t in ahead.step([seq("a", 12, 7, blocks=8),
                                            seq("b", 21, 8, blocks=8)])] == [13, 22]
    assert [t.token_id for t in ahead.step([seq("b", 22, 9, blocks=8)])] == [23]
    assert len(graphs.multi) == 2
    # then the launch made at the first step: its kept rows
    assert [t.token_id for t in ahead.step([seq("b", 23, 10, blocks=8)])] == [24]
    assert graphs.multi[2:] == [[(26, 13)]]
    assert ahead.used == 4 and ahead.multi_launched == 3


def test_a_step_unlike_the_multi_step_launch_drops_it_and_the_next():
    for other in ([seq("a", 12, 7, blocks=8), seq("c", 3, 2, blocks=8)],  # a new sequence
                  [seq("b", 21, 8, blocks=8), seq("a", 12, 7, blocks=8)],  # reordered
                  [seq("a", 12, 8, blocks=8)]):  # another position
        graphs = FakeGraphs(steps=3)
        ahead = DecodeAhead(graphs, max_model_len=64)
        ahead.finish([seq("a", 7, 5, blocks=8), seq("b", 9, 6, blocks=8)], torch.tensor([11, 20]))
        ahead.step([seq("a", 11, 6, blocks=8), seq("b", 20, 7, blocks=8)])
        assert ahead.step(other) is None
        assert ahead.step([seq("a", 12, 7, blocks=8), seq("b", 21, 8, blocks=8)]) is None
        assert ahead.step([seq("a", 14, 9, blocks=8), seq("b", 23, 10, blocks=8)]) is None


def test_sampled_rows_short_tables_or_ending_replies_launch_one_step():
    greedy_short = [seq("a", 7, 5, blocks=2)]  # 8 slots: positions 6..8 need a third block
    sampled = [seq("a", 7, 5, blocks=8, params=SamplingParams(temperature=0.7, seed=1))]
    # 2 tokens left after this one (max_tokens 6, 3 out before it): 3 steps would waste one
    ending = [seq("a", 7, 5, blocks=8, params=SamplingParams(max_tokens=6, temperature=0.0)),
              seq("b", 9, 6, blocks=8, params=SamplingParams(max_tokens=5, temperature=0.0))]
    for step in (greedy_short, sampled, ending):
        graphs = FakeGraphs(steps=3)
        ahead = DecodeAhead(graphs, max_model_len=64)
        ahead.finish(step, torch.tensor([11, 12][:len(step)]))
        assert graphs.multi == [] and len(graphs.replays) == 1
        assert ahead.take([seq("a", 11, 6, blocks=8)]) is not None
    graphs = FakeGraphs(steps=3)  # 3 left: all three steps are needed
    DecodeAhead(graphs, max_model_len=64).finish(
        [seq("a", 7, 5, blocks=8, params=SamplingParams(max_tokens=7, temperature=0.0))],
        torch.tensor([11]))
    assert len(graphs.multi) == 1


def test_logprobs_rows_run_ahead_one_step_and_hand_out_their_logprobs():
    """Rows with logprobs launch ahead (one step a replay: the multi-step graphs keep no
    logits); the step that takes the launch hands out each row's raw logprob and top
    alternatives, as ``sample`` computes them, and a row without logprobs gets none."""
    graphs = FakeGraphs(steps=3)
    ahead = DecodeAhead(graphs, max_model_len=64)
    lp2 = SamplingParams(max_tokens=100, temperature=0.0, logprobs=2)
    step = [seq("a", 7, 5, blocks=8, params=lp2), seq("b", 9, 6, blocks=8)]
    logits = torch.randn(2, VOCAB)
    tokens = logits.argmax(-1)
    out = ahead.finish(step, tokens, logprobs(logits, tokens, step))
    assert out == sample(logits, step)
    assert out[0].logprob is not None and len(out[0].top_logprobs) == 2
    assert out[1].logprob is None
    assert graphs.multi == [] and len(graphs.replays) == 1
    nxt = [seq("a", int(tokens[0]), 6, blocks=8, params=lp2),
           seq("b", int(tokens[1]), 7, blocks=8)]
    fake = torch.nn.functional.one_hot((tokens + 1) % VOCAB, VOCAB).float()  # the replay's
    got = ahead.step(nxt)
    assert [t.token_id for t in got] == ((tokens + 1) % VOCAB).tolist()
    assert got == sample(fake, nxt)
    third = [seq("a", (int(tokens[0]) + 1) % VOCAB, 7, blocks=8, params=lp2)]  # b has ended
    fake = torch.nn.functional.one_hot((tokens[:1] + 2) % VOCAB, VOCAB).float()
    assert ahead.step(third) == sample(fake, third)  # the kept row's logprobs
