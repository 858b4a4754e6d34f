"""What the HTTP layer serves: one model, its tokenizer and a running Engine; requests become token prompts and
their choices become engine jobs whose events arrive on one asyncio queue.

Entry point: Server (start(), launch(...) -> Launched, stop()).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tetra.data.bpe_dropout import DropoutBPE
from tetra.data.tokenizer import TextTokenizer
from tetra.infer.context import ContextOptions
from tetra.infer.engine import Engine, GenerationRequest, Ticket
from tetra.infer.prompt_filter import PerplexityFilter
from tetra.infer.sampling import SamplingConfig
from tetra.model import Transformer
from tetra.serve.choices import ChoiceEvent, ChoiceSink
from tetra.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest

# The context a server allocates for by default: models with 128k positions would otherwise reserve for 128k.
DEFAULT_MAX_LENGTH = 4096


@dataclass
class Launched:
    """The choices of one request, running: their events arrive on queue; cancel() stops the rest."""

    queue: asyncio.Queue[ChoiceEvent]
    tickets: list[Ticket]
    prompt_tokens: int

    def cancel(self) -> None:
        for ticket in self.tickets:
            ticket.cancel()


class Server:
    """One served model. Thread-safe to call from the event loop: the engine runs on its own thread."""

    def __init__(self, model: Transformer, tokenizer: TextTokenizer, name: str, max_batch_size: int = 8,
                 max_length: int | None = None, continuous: bool = True,
                 prompt_filter: PerplexityFilter | None = None, retokenize: float = 0.0, seed: int = 0,
                 context: ContextOptions | None = None) -> None:
        """prompt_filter refuses flagged prompts; retokenize > 0 encodes text prompts with BPE-dropout; context: the
        decoding attention policy, chunked prefill and where KV caches live."""
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.prompt_filter = prompt_filter
        self.dropout = DropoutBPE(tokenizer, retokenize, seed) if retokenize else None
        self.encode = self.dropout.encode if self.dropout else tokenizer.encode
        positions = model.config.max_position_embeddings
        self.max_length = min(max_length or min(positions, DEFAULT_MAX_LENGTH), positions)
        self.engine = Engine(model, max_batch_size, self.max_length, continuous, context)
        self.eos_ids = set(model.config.eos_token_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise ApiError(404, f"The model {name!r} does not exist; this server serves {self.name!r} "
                                "(GET /v1/models lists it).", param="model", code="model_not_found")

    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        """The prompt field as token lists: a string, strings, a token list or token lists."""
        prompt = request.prompt
        if isinstance(prompt, str):
            prompts = [self.encode(prompt, add_special_tokens=True)]
        elif all(isinstance(item, str) for item in prompt):
            prompts = [self.encode(item, add_special_tokens=True) for item in prompt]
        elif all(isinstance(item, int) for item in prompt):
            prompts = [list(prompt)]
        else:
            prompts = [list(item) for item in prompt]
        vocab = self.model.config.vocab_size
        for ids in prompts:
            if not ids:
                raise ApiError(400, "A prompt encodes to no tokens; send at least one character or token.",
                               param="prompt")
            if any(not 0 <= token < vocab for token in ids):
                raise ApiError(400, f"A prompt token id lies outside this model's vocabulary [0, {vocab}).",
                               param="prompt")
        return prompts

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        """The conversation rendered with the model's chat template, ending with the assistant's generation prompt."""
        messages = [{"role": message.role, "content": message.text()} for message in request.messages]
        try:
            if self.dropout:
                return self.dropout.encode_chat(messages)
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages), add_special_tokens=False)
        except Exception as error:
            raise ApiError(400, f"The messages do not fit this model's chat template: {error}",
                           param="messages") from None

    def screen(self, prompts: list[str | list[int]], param: str) -> None:
        """Refuse (400) when the perplexity filter flags a prompt: text is scored as the tokenizer encodes it (as
        the filter was calibrated), token lists as sent. Slow (a forward pass): call it off the event loop."""
        if self.prompt_filter is None:
            return
        for prompt in prompts:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            scores = self.prompt_filter.check(self.model, ids)
            if scores is not None:
                raise ApiError(400, f"The prompt was flagged by the perplexity filter (mean NLL {scores.whole:.2f}, "
                                    f"worst {self.prompt_filter.window}-token window {scores.worst_window:.2f}; "
                                    f"thresholds {self.prompt_filter.whole_threshold:.2f} and "
                                    f"{self.prompt_filter.window_threshold:.2f}).", param=param,
                               code="prompt_flagged")

    def token_budget(self, prompt_ids: list[int], max_tokens: int | None) -> int:
        """max_tokens as asked (checked against the context), or all the context left when it was not given."""
        room = self.max_length - len(prompt_ids)
        if room < 1 and max_tokens != 0:
            raise ApiError(400, f"The prompt is {len(prompt_ids)} tokens; this server's context is "
                                f"{self.max_length}. Shorten the prompt.", param="prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise ApiError(400, f"max_tokens is {max_tokens}, but the prompt ({len(prompt_ids)} tokens) leaves room "
                                f"for only {max(room, 0)} in this server's context of {self.max_length}. Lower "
                                "max_tokens or shorten the prompt.", param="max_tokens",
                           code="context_length_exceeded")
        return max_tokens

    def launch(self, prompts: list[list[int]], max_tokens: list[int], sampling: SamplingConfig, seed: int | None,
               stop_strings: list[str], logprobs: int | None, score_prompt: bool) -> Launched:
        """Submit one engine job per prompt (choice index = position in prompts); seeds differ per choice."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[ChoiceEvent] = asyncio.Queue()
        tickets = []
        for index, (ids, budget) in enumerate(zip(prompts, max_tokens, strict=True)):
            sink = ChoiceSink(index, queue, loop, self.tokenizer, stop_strings, self.eos_ids)
            job = GenerationRequest(ids, budget, sampling, None if seed is None else seed + index,
                                    frozenset(self.eos_ids), logprobs, score_prompt)
            tickets.append(self.engine.submit(job, sink))
        return Launched(queue, tickets, sum(len(ids) for ids in prompts))
