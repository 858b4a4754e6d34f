"""The continuous-batching engine: sequences that join and leave a running batch produce exactly what each would
alone, at its own positions (rotary, learned positions, sliding window), with per-request sampling and logprobs."""

from __future__ import annotations

import pytest
import torch

from hf_factory import VOCAB
from tetra.infer.engine import Engine, GenerationRequest
from tetra.infer.generate import generate_ids
from tetra.infer.logprobs import logprobs_of
from tetra.infer.sampling import SamplingConfig
from tetra.model import ModelConfig, Transformer

PROMPTS = [[5, 17, 33, 8, 60, 12, 9], [44, 3], [70, 71, 72, 73, 74], [9] * 11, [30, 31]]


class Collect:
    """A TokenSink that records everything; optionally stops after a given token count."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.tokens: list[int] = []
        self.logprobs: list = []
        self.prompt: list = []
        self.reason: str | None = None
        self.stop_after = stop_after

    def prompt_scored(self, logprobs) -> None:
        self.prompt = logprobs

    def token(self, token_id, logprob) -> bool:
        self.tokens.append(token_id)
        self.logprobs.append(logprob)
        return self.stop_after is not None and len(self.tokens) >= self.stop_after

    def finished(self, reason, error) -> None:
        assert error is None, error
        self.reason = reason


def _model(positions: str = "rope", sliding_window: int = 0) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, positions=positions,
                         sliding_window=sliding_window, max_position_embeddings=128)
    model = Transformer(config)
    model.init_weights(std=0.3)
    return model.eval()


def _run(engine: Engine, requests: list[GenerationRequest], stagger: int = 0) -> list[Collect]:
    """Submit the requests `stagger` steps apart (so they join a running batch), then run until all finish."""
    sinks = [Collect() for _ in requests]
    pending = list(zip(requests, sinks, strict=True))
    steps = 0
    while pending or engine.active or not engine.inbox.empty() or engine.waiting or engine.prefilling:
        if pending and steps % (stagger + 1) == 0:
            request, sink = pending.pop(0)
            engine.submit(request, sink)
        engine.step()
        steps += 1
        assert steps < 1000
    return sinks


@pytest.mark.parametrize("positions,window", [("rope", 0), ("learned", 0), ("rope", 4)])
def test_staggered_batch_equals_each_sequence_alone(positions, window):
    model = _model(positions, window)
    expected = [generate_ids(model, [prompt], 12) for prompt in PROMPTS]
    requests = [GenerationRequest(prompt, 12) for prompt in PROMPTS]
    for stagger in (0, 1, 3):
        for slots in (2, 8):  # 2 slots: requests wait in the queue and reuse freed slots
            sinks = _run(Engine(model, max_batch_size=slots), requests, stagger)
            assert [[sink.tokens] for sink in sinks] == expected, (stagger, slots)
            assert all(sink.reason == "length" for sink in sinks)


def test_seeded_sampling_is_per_request_and_matches_generate():
    model = _model()
    sampling = SamplingConfig(temperature=1.0, top_p=0.9)
    expected = [generate_ids(model, [prompt], 10, sampling, seed=7) for prompt in PROMPTS[:3]]
    requests = [GenerationRequest(prompt, 10, sampling, seed=7) for prompt in PROMPTS[:3]]
    sinks = _run(Engine(model, max_batch_size=4), requests, stagger=2)
    assert [[sink.tokens] for sink in sinks] == expected


def test_stop_ids_sink_stop_and_cancel_free_slots():
    model = _model()
    free_run = generate_ids(model, [PROMPTS[0]], 12)[0]
    engine = Engine(model, max_batch_size=1)
    stop_at = Collect()
    engine.submit(GenerationRequest(PROMPTS[0], 12, stop_ids=frozenset({free_run[3]})), stop_at)
    sink_stopped = Collect(stop_after=2)
    engine.submit(GenerationRequest(PROMPTS[0], 12), sink_stopped)
    cancelled = Collect()
    ticket = engine.submit(GenerationRequest(PROMPTS[1], 12), cancelled)
    ticket.cancel()
    while engine.step():
        pass
    assert stop_at.tokens == free_run[: free_run.index(free_run[3]) + 1] and stop_at.reason == "stop"
    assert sink_stopped.tokens == free_run[:2] and sink_stopped.reason == "stop"
    assert cancelled.tokens == [] and cancelled.reason == "cancelled"
    assert not engine.active


def test_logprobs_of_prompt_and_tokens_equal_a_full_forward():
    model = _model()
    prompt = PROMPTS[0]
    sink = Collect()
    engine = Engine(model)
    engine.submit(GenerationRequest(prompt, 4, logprobs=3, score_prompt=True), sink)
    while engine.step():
        pass
    full = torch.tensor([prompt + sink.tokens])
    with torch.no_grad():
        logits = model(full)[0]
    reference = logprobs_of(logits[:-1], full[0, 1:], 3)
    scored = sink.prompt[1:] + sink.logprobs
    assert sink.prompt[0] is None and len(scored) == len(reference)
    for got, want in zip(scored, reference, strict=True):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert [token for token, _ in got.top] == [token for token, _ in want.top]
    # greedy: every generated token is the top alternative
    assert all(score.top[0][0] == token for score, token in zip(sink.logprobs, sink.tokens, strict=True))


def test_requests_beyond_the_context_are_refused():
    engine = Engine(_model(), max_length=32)
    with pytest.raises(ValueError, match="over the context of 32"):
        engine.submit(GenerationRequest([1] * 30, 3), Collect())


@pytest.mark.parametrize("kind", ["topk", "h2o"])
def test_a_sparse_policy_engine_equals_generate_with_that_policy(kind):
    from tetra.infer.attention.policy import AttentionPolicy
    from tetra.infer.context import ContextOptions

    model = _model()
    context = ContextOptions(AttentionPolicy(kind, budget=0.05, recent=2), prefill_chunk=4)
    prompts = [[(7 * i + j) % (VOCAB - 3) + 3 for j in range(30 + 9 * i)] for i in range(3)]
    expected = [generate_ids(model, [prompt], 10, context=context) for prompt in prompts]
    dense = [generate_ids(model, [prompt], 10) for prompt in prompts]
    requests = [GenerationRequest(prompt, 10, logprobs=0) for prompt in prompts]
    sinks = _run(Engine(model, max_batch_size=2, context=context), requests, stagger=1)
    assert [[sink.tokens] for sink in sinks] == expected
    assert expected != dense  # the policy changed something, so the equality above means something


@pytest.mark.parametrize("positions,window", [("rope", 0), ("learned", 0), ("rope", 4)])
def test_chunked_prefill_in_the_shared_batch_equals_each_sequence_alone(positions, window):
    """A context that only sets prefill_chunk keeps the shared batch: prompts longer than the chunk are prefilled
    4 positions per step while the others decode, and every sequence still gets exactly its own tokens."""
    from tetra.infer.context import ContextOptions

    model = _model(positions, window)
    prompts = PROMPTS + [[(5 * j) % (VOCAB - 3) + 3 for j in range(23)], [(3 * j + 1) % (VOCAB - 3) + 3
                                                                          for j in range(14)]]
    expected = [generate_ids(model, [prompt], 9) for prompt in prompts]
    engine = Engine(model, max_batch_size=3, context=ContextOptions(prefill_chunk=4))
    assert engine.context is None and engine.prefill_chunk == 4
    sinks = _run(engine, [GenerationRequest(prompt, 9) for prompt in prompts], stagger=1)
    assert [[sink.tokens] for sink in sinks] == expected
    assert all(sink.reason == "length" for sink in sinks)


def test_chunked_prefill_of_prompts_admitted_together_in_mixed_lengths():
    """One right-padded group whose rows end in different chunks (a short one first): each row leaves the group
    when its prompt is through, and the rest keep their own tokens."""
    from tetra.infer.context import ContextOptions

    model = _model()
    prompts = [[44, 3], [(5 * j) % (VOCAB - 3) + 3 for j in range(23)], [70, 71, 72, 73, 74, 75, 76],
               [(3 * j + 1) % (VOCAB - 3) + 3 for j in range(14)]]
    expected = [generate_ids(model, [prompt], 6) for prompt in prompts]
    engine = Engine(model, max_batch_size=4, context=ContextOptions(prefill_chunk=4))
    sinks = [Collect() for _ in prompts]
    for prompt, sink in zip(prompts, sinks, strict=True):
        engine.submit(GenerationRequest(prompt, 6), sink)
    while engine.active or engine.prefilling or not engine.inbox.empty():
        engine.step()
    assert [[sink.tokens] for sink in sinks] == expected


def test_running_sequences_keep_decoding_while_a_long_prompt_prefills():
    from tetra.infer.context import ContextOptions

    engine = Engine(_model(), max_batch_size=2, context=ContextOptions(prefill_chunk=4))
    running, arriving = Collect(), Collect()
    engine.submit(GenerationRequest([5, 6, 7], 30), running)
    engine.step()
    assert len(running.tokens) == 1
    engine.submit(GenerationRequest([(3 * j) % (VOCAB - 3) + 3 for j in range(22)], 5), arriving)
    for step in range(1, 7):  # 22 prompt positions in chunks of 4: the first token comes with the 6th chunk
        engine.step()
        assert len(running.tokens) == 1 + step
        assert len(arriving.tokens) == (1 if step == 6 else 0)
    assert not engine.prefilling


def test_a_cancelled_request_leaves_while_its_prompt_prefills():
    from tetra.infer.context import ContextOptions

    engine = Engine(_model(), max_batch_size=1, context=ContextOptions(prefill_chunk=4))
    first, second = Collect(), Collect()
    ticket = engine.submit(GenerationRequest(list(range(3, 23)), 5), first)
    engine.submit(GenerationRequest([5, 6], 3), second)
    engine.step()
    ticket.cancel()
    sinks = _run(engine, [])
    assert first.reason == "cancelled" and not first.tokens
    assert second.reason == "length" and len(second.tokens) == 3 and sinks == []
