"""Pipelined decode (Engine.step with a supports_async backend): a step of plain decodes (greedy or sampled)
leaves its tokens on the device and the next step is launched from them before the host reads them. On the tiny model
with the reference backend marked async, every output must equal the synchronous engine's, sequences
that finish while a step is in flight must not leak blocks, and the pipeline must actually run."""
from __future__ import annotations

import random

from engine.sequence import SamplingParams
from tests.conftest import TINY, make_tiny_engine, run_to_completion


def make_engine(pipelined: bool, **options):
    eng = make_tiny_engine(**options)
    eng.backend.supports_async = pipelined     # the reference backend honours Batch.device_input_ids
    return eng


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, TINY.vocab_size) for _ in range(rng.randrange(2, 60))] for _ in range(n)]


def run(pipelined: bool, requests, arrivals=None, **options):
    """requests: (prompt, params); arrivals[i]: steps run before request i is submitted."""
    eng = make_engine(pipelined, **options)
    handles = []
    for i, (p, params) in enumerate(requests):
        for _ in range((arrivals or [0] * len(requests))[i]):
            eng.step()
        handles.append(eng.submit(p, params))
    done = run_to_completion(eng, handles)
    return eng, [(c.token_ids, c.finish_reason) for c in done]


def assert_all_free(eng) -> None:
    eng.blocks.check_invariants()
    assert eng.blocks.num_used_blocks == 0
    assert eng.blocks.num_free_blocks == eng.num_blocks


def pipelines_like_synchronous(reqs, what: str, min_ahead: int = 15):
    """The synchronous engine's outputs for reqs, after checking the pipelined engine gives the same, ran
    more than min_ahead steps ahead (else: `what` did not pipeline) and freed every block."""
    _, sync = run(False, reqs)
    eng, piped = run(True, reqs)
    assert piped == sync
    assert eng.counters["steps_ahead"] > min_ahead, f"{what} did not pipeline"
    assert_all_free(eng)
    return sync


def test_pipelined_equals_synchronous_with_mixed_finishes():
    ps = prompts(6, seed=3)
    lengths = [3, 24, 9, 17, 1, 30]
    reqs = [(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)) for p, n in zip(ps, lengths)]
    _, sync = run(False, reqs)
    # stop tokens taken from the synchronous outputs: requests end mid-stream while a step is in flight
    reqs[1] = (ps[1], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                     stop_token_ids=(sync[1][0][6],)))
    reqs[3] = (ps[3], SamplingParams(temperature=0.0, max_tokens=17, stop_token_ids=(sync[3][0][2],)))
    sync = pipelines_like_synchronous(reqs, "greedy rows", min_ahead=10)
    assert sync[1][1] == "stop" and len(sync[1][0]) < 24


def test_arrivals_and_sampling_rows_fall_back_and_resume():
    ps = prompts(5, seed=4)
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=12, ignore_eos=True)
    reqs = [(ps[0], greedy), (ps[1], greedy), (ps[2], sampled), (ps[3], greedy), (ps[4], greedy)]
    arrivals = [0, 4, 3, 9, 5]
    _, sync = run(False, reqs, arrivals)
    eng, piped = run(True, reqs, arrivals)
    assert piped == sync
    assert eng.counters["steps_ahead"] > 0
    assert_all_free(eng)


def test_sampled_rows_pipeline_with_their_own_generators():
    """Seeded sampled rows (top-k, top-p, min-p, plain temperature) beside greedy ones run pipelined, drawing
    each token from the request's own generator as the synchronous engine does. Penalised rows pipeline too,
    their penalties counting the token still in flight, and so does a row with logprobs beside them.
    Outputs match the synchronous engine's throughout."""
    ps = prompts(6, seed=9)
    kinds = [dict(temperature=0.9, top_k=30), dict(temperature=1.1, top_p=0.8), dict(temperature=0.0),
             dict(temperature=1.3, min_p=0.05), dict(temperature=1.5), dict(temperature=0.7, top_p=0.95, top_k=50)]
    reqs = [(p, SamplingParams(**kw, seed=40 + i, max_tokens=10 + 3 * i, ignore_eos=True))
            for i, (p, kw) in enumerate(zip(ps, kinds))]
    sync = pipelines_like_synchronous(reqs, "sampled rows")
    assert len({tuple(t) for t, _ in sync}) == len(sync)
    reqs[4] = (ps[4], SamplingParams(temperature=1.5, seed=44, max_tokens=22, ignore_eos=True, repetition_penalty=1.3))
    reqs[2] = (ps[2], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, presence_penalty=1.5,
                                     frequency_penalty=1.0))
    reqs[0] = (ps[0], SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, repetition_penalty=3.0))
    sync = pipelines_like_synchronous(reqs, "penalised rows")
    _, plain = run(False, [(p, SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)) for p in ps[:1]])
    assert plain[0][0] != sync[0][0]                       # the penalty changed the greedy row's tokens
    reqs[1] = (ps[1], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=2))
    pipelines_like_synchronous(reqs, "a batch with a logprobs row")


def test_plain_rows_take_the_backends_sample_step():
    """A step of unpenalised rows without logprobs (sampled, greedy beside them) goes to the backend's
    sample_step whole (CUDA: one graph replay with the sampling kernel inside). Stood in for here by the
    forward and the Sampler, it must be handed every such step with the rows' own generators, and when it
    declines (None: no graph fits, nothing drawn) the engine samples itself: the outputs equal the
    synchronous engine's either way. A penalised row or one with logprobs keeps its steps off it."""
    ps = prompts(5, seed=21)
    kinds = [dict(temperature=0.9, top_k=30), dict(temperature=0.0), dict(temperature=1.1, top_p=0.8),
             dict(temperature=1.3, min_p=0.05), dict(temperature=0.7, top_p=0.95, top_k=50)]
    reqs = [(p, SamplingParams(**kw, seed=60 + i, max_tokens=12 + 4 * i, ignore_eos=True))
            for i, (p, kw) in enumerate(zip(ps, kinds))]

    def with_sample_step(requests):
        eng, calls = make_engine(True), []

        def sample_step(batch, params, generators):
            assert [p.logprobs for p in params] == [None] * len(params)
            calls.append(len(params))
            if len(calls) % 3 == 0:                    # declined: the engine's own path takes the step
                return None
            return eng.sampler.tokens(eng.model.forward(batch), params, generators)
        eng.model.sample_step = sample_step
        done = run_to_completion(eng, [eng.submit(p, params) for p, params in requests])
        assert_all_free(eng)
        return calls, [(c.token_ids, c.finish_reason) for c in done]

    _, sync = run(False, reqs)
    calls, piped = with_sample_step(reqs)
    assert piped == sync
    assert len(calls) > 15 and max(calls) == len(reqs)
    for extra in (dict(repetition_penalty=1.3), dict(logprobs=2)):      # the longest row, in every step
        reqs[4] = (ps[4], SamplingParams(**kinds[4], seed=64, max_tokens=40, ignore_eos=True, **extra))
        _, sync = run(False, reqs)
        calls, piped = with_sample_step(reqs)
        assert piped == sync and calls == [], extra


def test_logprobs_rows_pipeline_with_their_logprobs():
    """Rows asking for logprobs (greedy and sampled, penalised, n from 0 -- the chosen token's alone -- to
    5) pipeline like the others, their logprobs computed on the device beside the step's tokens and read
    with them: every token's logprobs equal the synchronous engine's (to rounding), rows finishing
    mid-flight included."""
    ps = prompts(5, seed=12)
    kinds = [dict(temperature=0.0, logprobs=3), dict(temperature=0.9, top_p=0.9, seed=3, logprobs=1),
             dict(temperature=0.0), dict(temperature=1.2, seed=5, logprobs=0),
             dict(temperature=0.0, repetition_penalty=1.2, logprobs=5)]
    reqs = [(p, SamplingParams(**kw, max_tokens=8 + 5 * i, ignore_eos=True)) for i, (p, kw) in enumerate(zip(ps, kinds))]

    def outputs(pipelined: bool):
        eng = make_engine(pipelined)
        done = run_to_completion(eng, [eng.submit(p, params) for p, params in reqs])
        return eng, [(c.token_ids, c.logprobs) for c in done]
    _, sync = outputs(False)
    eng, piped = outputs(True)
    # the same tokens and top ids; values equal up to the last bits (a step launched ahead can carry a
    # finished row, and a batch of another size can round a logit differently)
    assert [t for t, _ in piped] == [t for t, _ in sync]
    for (_, got), (_, want) in zip(piped, sync):
        assert (got is None) == (want is None)
        for g, w in zip(got or [], want or []):
            assert g["token_id"] == w["token_id"] and abs(g["logprob"] - w["logprob"]) < 1e-4
            assert [i for i, _ in g["top"]] == [i for i, _ in w["top"]]
            assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(g["top"], w["top"]))
    assert eng.counters["steps_ahead"] > 15, "rows with logprobs did not pipeline"
    assert_all_free(eng)
    for (tokens, logprobs), (_, params) in zip(sync, reqs):
        if params.logprobs is None:
            assert logprobs is None
            continue
        assert [e["token_id"] for e in logprobs] == tokens
        assert all(len(e["top"]) == params.logprobs and e["logprob"] <= 0.0 for e in logprobs)


def test_abort_while_a_step_is_in_flight_frees_every_block():
    ps = prompts(3, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    eng = make_engine(True)
    handles = [eng.submit(p, params) for p in ps]
    for _ in range(8):
        eng.step()
    assert eng._inflight is not None, "no step in flight to abort under"
    eng.abort(handles[1].request_id)
    done = run_to_completion(eng, handles)
    assert done[1].finish_reason == "abort" and len(done[1].token_ids) < 40
    assert [len(done[i].token_ids) for i in (0, 2)] == [40, 40]
    assert_all_free(eng)


def test_blocks_filled_by_pipelined_steps_are_cached_like_synchronous_ones():
    """A follow-up whose prompt extends the first request's output reuses the blocks decoded ahead."""
    p = prompts(1, seed=6)[0]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    cached = {}
    for pipelined in (False, True):
        eng = make_engine(pipelined, enable_prefix_caching=True)
        first = run_to_completion(eng, [eng.submit(p, params)])[0]
        follow = run_to_completion(eng, [eng.submit(p + first.token_ids[:32], params)])[0]
        cached[pipelined] = (first.token_ids, follow.token_ids, follow.num_cached_tokens)
        assert eng.blocks.num_used_blocks == 0
    assert cached[True] == cached[False]
    assert cached[True][2] >= 16 * ((len(p) + 32) // 16) - 16      # decoded blocks were hashed and reused


def test_beam_requests_beside_pipelined_greedy_ones():
    """A beam search in the batch keeps every step synchronous (its rows need the host); outputs unchanged."""
    from engine.beam import BeamParams
    ps = prompts(3, seed=8)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    out = {}
    for pipelined in (False, True):
        eng = make_engine(pipelined)
        handles = [eng.submit(p, greedy) for p in ps[:2]]
        beam = eng.submit_beam(ps[2], BeamParams(beam_width=3, max_tokens=8))
        done = run_to_completion(eng, handles + [beam])
        out[pipelined] = [c.token_ids for c in done]
        assert eng.blocks.num_used_blocks == 0
    assert out[True] == out[False]
