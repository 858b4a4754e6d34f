"""A generation engine with continuous batching: requests wait in a queue, join the running batch between decode
steps (each in its own KV-cache slot, at its own position), and leave it the moment they finish.

Entry points: Engine (submit(request, sink) from any thread; step() or start() to run it), GenerationRequest,
TokenSink (what the engine reports back: prompt scores, each token, the end).
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tetra.infer.attention.factory import make_cache
from tetra.infer.context import ContextOptions, check_cache_fits
from tetra.infer.logprobs import TokenLogprob, logprobs_of, prompt_logprobs, right_pad
from tetra.infer.sampling import SamplingConfig, sample_next
from tetra.infer.slot_cache import SlotCache, decode_mask
from tetra.model import KVCache, Transformer
from tetra.model.abacus import digit_positions

# How long an idle engine thread waits for a request before checking whether it was asked to stop.
IDLE_WAIT_S = 0.05


class TokenSink(Protocol):
    """Receives one request's results, called from the engine's thread."""

    def prompt_scored(self, logprobs: list[TokenLogprob | None]) -> None:
        """The prompt's own token log-probabilities (only when the request asked for them)."""

    def token(self, token_id: int, logprob: TokenLogprob | None) -> bool:
        """A new token; return True to stop the request here (a stop string was completed, say)."""

    def finished(self, reason: str, error: BaseException | None) -> None:
        """The request is over: reason is 'stop' (an EOS id or the sink), 'length', 'cancelled' or 'error'."""


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to continue."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # None: no log-probabilities; k >= 0: each token's, with the top k alternatives
    score_prompt: bool = False  # also report the prompt tokens' log-probabilities (OpenAI's echo + logprobs)


@dataclass
class _Job:
    request: GenerationRequest
    sink: TokenSink
    generator: torch.Generator
    slot: int = -1
    position: int = 0  # where this sequence's next token goes in its slot
    generated: int = 0
    pending: torch.Tensor | None = None  # logits [vocab] for the next token
    cancelled: bool = False
    cache: KVCache | None = None  # its own cache, when the engine decodes with a sparse attention policy


@dataclass
class _Prefill:
    """Sequences admitted together whose prompts are prefilled `Engine.prefill_chunk` positions per engine step."""

    jobs: list[_Job]  # those whose prompt is not yet through: each is longer than `done`
    tokens: torch.Tensor  # the prompts of the jobs admitted together, right-padded [admitted, longest]
    rows: list[int]  # each job's row of tokens
    done: int = 0  # positions prefilled so far

    def remove(self, job: _Job) -> None:
        index = self.jobs.index(job)
        del self.jobs[index], self.rows[index]


class Ticket:
    """A handle on a submitted request; cancel() ends it before its next token (a client that went away)."""

    def __init__(self, job: _Job) -> None:
        self._job = job

    def cancel(self) -> None:
        self._job.cancelled = True


class Engine:
    """Batched KV-cache decoding over a fixed number of slots. continuous=False is static batching: a batch is
    formed only when the previous one has entirely finished (the baseline continuous batching is measured against).

    context (a sparse attention policy, a cache elsewhere): every sequence then gets its own cache of that policy
    and is prefilled and decoded on its own (policies keep per-sequence state such as H2O's evictions); requests
    still join and leave between steps. A context that only sets prefill_chunk keeps the shared batch and prefills
    a long prompt one chunk per engine step, between the decode steps of the sequences already running, so an
    arrival does not stall their tokens for its whole prompt (chunked prefill).
    """

    def __init__(self, model: Transformer, max_batch_size: int = 8, max_length: int | None = None,
                 continuous: bool = True, context: ContextOptions | None = None) -> None:
        self.model = model.eval()
        self.device = model.embed.weight.device
        self.max_length = max_length or model.config.max_position_embeddings
        self.continuous = continuous
        # Chunked prefill in the shared batch: dense attention, the model's cache; abacus models, whose digit
        # positions continue across a prompt, prefill whole.
        chunk = context.prefill_chunk if context is not None else 0
        self.prefill_chunk = 0
        if chunk and dataclasses.replace(context, prefill_chunk=0) == ContextOptions() and model.abacus is None:
            self.prefill_chunk, context = chunk, None
        self.context = context if context is not None and context != ContextOptions() else None
        self.slots = max_batch_size
        # With context options every job owns a policy cache; the shared slot cache is then never used.
        self.cache = None if self.context else SlotCache(model.config, max_batch_size, self.max_length,
                                                         model.embed.weight.dtype, self.device)
        self.inbox: queue.Queue[_Job] = queue.Queue()
        self.waiting: deque[_Job] = deque()
        self.active: dict[int, _Job] = {}
        self.prefilling: deque[_Prefill] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- submitting (any thread)
    def submit(self, request: GenerationRequest, sink: TokenSink) -> Ticket:
        """Queue a request; raises ValueError when it cannot fit this engine's context."""
        total = len(request.prompt_ids) + request.max_new_tokens
        if not request.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if total > self.max_length:
            raise ValueError(f"prompt ({len(request.prompt_ids)} tokens) plus max_new_tokens "
                             f"({request.max_new_tokens}) is {total}, over the context of {self.max_length} tokens")
        generator = torch.Generator(device=self.device)
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        job = _Job(request, sink, generator)
        self.inbox.put(job)
        return Ticket(job)

    # ----- running (one thread)
    def start(self) -> None:
        """Run the engine loop in a background thread until stop()."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="tetra-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.active and not self.waiting and not self.prefilling:
                try:
                    self.waiting.append(self.inbox.get(timeout=IDLE_WAIT_S))
                except queue.Empty:
                    continue
            self.step()

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit what may join, then emit one token for every running sequence; False when there was nothing."""
        while True:
            try:
                self.waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for slot, job in list(self.active.items()):
            if job.cancelled:
                self._finish(slot, "cancelled")
        for group in self.prefilling:
            for job in [job for job in group.jobs if job.cancelled]:
                group.remove(job)
                job.sink.finished("cancelled", None)
        while self.prefilling and not self.prefilling[0].jobs:
            self.prefilling.popleft()
        if self.continuous or not (self.active or self.prefilling):
            self._admit()
        if self.prefilling:
            self._prefill_next_chunk()
        if not self.active:
            return bool(self.prefilling)
        self._decode()
        return True

    def _admit(self) -> None:
        """Give waiting requests the free slots and prefill them: those scoring their prompt one by one, the
        others in one right-padded forward pass (a burst of arrivals costs one prefill, not one each)."""
        held = set(self.active) | {job.slot for group in self.prefilling for job in group.jobs}
        free = [slot for slot in range(self.slots) if slot not in held]
        joining = []
        while free and self.waiting:
            job = self.waiting.popleft()
            if job.cancelled:
                job.sink.finished("cancelled", None)
                continue
            job.slot = free.pop(0)
            joining.append(job)
        scoring = [job for job in joining if job.request.score_prompt]
        plain = [job for job in joining if not job.request.score_prompt]
        alone = scoring + plain if self.context else scoring
        together = [] if self.context or not plain else [plain]
        for group in [[job] for job in alone] + together:
            longest = max(len(job.request.prompt_ids) for job in group)
            if self.prefill_chunk and not group[0].request.score_prompt and longest > self.prefill_chunk:
                prompts = [job.request.prompt_ids for job in group]
                self.prefilling.append(_Prefill(group, right_pad(prompts, self.device), list(range(len(group)))))
                continue
            try:
                self._prefill(group)
            except Exception as error:  # one bad request must not take the engine down
                traceback.print_exc(file=sys.stderr)
                for job in group:
                    job.sink.finished("error", error)
                continue
            for job in group:
                self._activate(job)

    def _activate(self, job: _Job) -> None:
        """A prefilled sequence joins the decode batch (or ends, when it asked for no new tokens)."""
        if job.request.max_new_tokens == 0:
            job.sink.finished("length", None)
        else:
            self.active[job.slot] = job

    def _prefill_next_chunk(self) -> None:
        """Prefill the next prefill_chunk positions of the oldest group still prefilling (the sequences whose prompt
        reaches that far); a sequence whose prompt ends in this chunk gets its first logits and joins the decode
        batch."""
        group = self.prefilling[0]
        start, end = group.done, group.done + self.prefill_chunk
        jobs = list(group.jobs)
        try:
            view = self.cache.prefill_view([job.slot for job in jobs])
            hidden = self.model(group.tokens[group.rows, start:end], kv_cache=view, cache_start=start,
                                hidden_only=True)
            ending = [row for row, job in enumerate(jobs) if len(job.request.prompt_ids) <= end]
            last = torch.tensor([len(jobs[row].request.prompt_ids) - 1 - start for row in ending], device=self.device)
            logits = self.model.head(hidden[ending, last]).float() if ending else None
        except Exception as error:  # one bad request must not take the engine down
            traceback.print_exc(file=sys.stderr)
            self.prefilling.popleft()
            for job in group.jobs:
                job.sink.finished("error", error)
            return
        group.done = end
        for index, row in enumerate(ending):
            job = jobs[row]
            job.pending, job.position = logits[index], len(job.request.prompt_ids)
            group.remove(job)
            self._activate(job)
        if not group.jobs:
            self.prefilling.popleft()

    def _prefill(self, jobs: list[_Job]) -> None:
        if self.context:
            return self._prefill_alone(jobs[0])
        prompts = [job.request.prompt_ids for job in jobs]
        tokens = right_pad(prompts, self.device)
        view = self.cache.prefill_view([job.slot for job in jobs])
        hidden = self.model(tokens, kv_cache=view, hidden_only=True)
        last = torch.tensor([len(ids) - 1 for ids in prompts], device=self.device)
        if self.model.abacus is not None:  # the run of digits each prompt ends on, padding left out
            places = digit_positions(tokens, self.model.abacus.digit_ids(self.device))
            self.cache.digit_runs[[job.slot for job in jobs]] = places[torch.arange(len(jobs)), last]
        logits = self.model.head(hidden[torch.arange(len(jobs), device=self.device), last]).float()
        for row, job in enumerate(jobs):
            if job.request.score_prompt:
                job.sink.prompt_scored(prompt_logprobs(self.model, hidden[row], prompts[row],
                                                       job.request.logprobs or 0))
            job.pending = logits[row]
            job.position = len(prompts[row])

    def _prefill_alone(self, job: _Job) -> None:
        """One sequence into a cache of its own, chunk by chunk when the context options say so."""
        request, context = job.request, self.context
        prompt = request.prompt_ids
        length = len(prompt) + request.max_new_tokens
        dtype = context.kv_dtype or self.model.embed.weight.dtype
        device = context.kv_device or self.device
        check_cache_fits(self.model.config, 1, length, dtype, device, context.attention)
        job.cache = make_cache(self.model, context.attention, 1, length, dtype, device)
        ids = torch.tensor([prompt], device=self.device)
        step = context.prefill_chunk or len(prompt)
        pieces = [self.model(ids[:, start : start + step], kv_cache=job.cache, cache_start=start, hidden_only=True)
                  for start in range(0, len(prompt), step)]
        job.cache.end_prefill(None)
        hidden = torch.cat(pieces, dim=1)[0] if request.score_prompt else pieces[-1][0]
        if request.score_prompt:
            job.sink.prompt_scored(prompt_logprobs(self.model, hidden, prompt, request.logprobs or 0))
        job.pending = self.model.head(hidden[-1]).float()
        job.position = len(prompt)

    def _decode(self) -> None:
        jobs = sorted(self.active.values(), key=lambda job: job.slot)
        logits = torch.stack([job.pending for job in jobs])
        chosen = self._sample(jobs, logits)
        scores = self._scores(jobs, logits, chosen)
        running = []
        for job, token, score in zip(jobs, chosen.tolist(), scores, strict=True):
            job.generated += 1
            stop_requested = job.sink.token(token, score)
            if token in job.request.stop_ids or stop_requested:
                self._finish(job.slot, "stop")
            elif job.generated >= job.request.max_new_tokens:
                self._finish(job.slot, "length")
            else:
                running.append((job, token))
        if running:
            try:
                self._forward(running)
            except Exception as error:
                traceback.print_exc(file=sys.stderr)
                for job, _ in running:
                    self._finish(job.slot, "error", error)

    def _sample(self, jobs: list[_Job], logits: torch.Tensor) -> torch.Tensor:
        chosen = logits.argmax(dim=-1)
        for row, job in enumerate(jobs):
            if not job.request.sampling.greedy:
                chosen[row] = sample_next(logits[row : row + 1], job.request.sampling, job.generator)[0]
        return chosen

    @staticmethod
    def _scores(jobs: list[_Job], logits: torch.Tensor, chosen: torch.Tensor) -> list[TokenLogprob | None]:
        wanted = [row for row, job in enumerate(jobs) if job.request.logprobs is not None]
        scores: list[TokenLogprob | None] = [None] * len(jobs)
        if wanted:
            top = max(jobs[row].request.logprobs or 0 for row in wanted)
            for row, score in zip(wanted, logprobs_of(logits[wanted], chosen[wanted], top), strict=True):
                keep = jobs[row].request.logprobs or 0
                scores[row] = TokenLogprob(score.logprob, score.top[:keep])
        return scores

    def _forward(self, running: list[tuple[_Job, int]]) -> None:
        if self.context:
            for job, token in running:
                tokens = torch.tensor([[token]], device=self.device)
                job.pending = self.model(tokens, kv_cache=job.cache, cache_start=job.position,
                                         last_only=True)[0, -1].float()
                job.position += 1
            return
        slots = [job.slot for job, _ in running]
        positions = [job.position for job, _ in running]
        tokens = torch.tensor([[token] for _, token in running], dtype=torch.long, device=self.device)
        view = self.cache.decode_view(slots, positions)
        mask = decode_mask(positions, self.model.config.sliding_window, self.device)
        position_ids = torch.tensor(positions, device=self.device)[:, None]
        logits = self.model(tokens, attention_mask=mask, position_ids=position_ids, kv_cache=view,
                            cache_start=view.length - 1, last_only=True)[:, -1].float()
        for row, (job, _) in enumerate(running):
            job.pending = logits[row]
            job.position += 1

    def _finish(self, slot: int, reason: str, error: BaseException | None = None) -> None:
        job = self.active.pop(slot)
        job.pending = job.cache = None
        job.sink.finished(reason, error)
