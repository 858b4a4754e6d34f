"""tetra as a model of EleutherAI's lm-eval: loglikelihood, loglikelihood_rolling and generate_until, batched.
Importing this module registers the name "tetra" (`--model tetra --model_args path=...`).

Entry points: TetraLM (lm-eval's LM interface over a tetra model), evaluate(model_path, tasks, ...) -> results.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from tetra.adapters.peft_io import load_model_with_adapter
from tetra.data.gguf_tokenizer import load_tokenizer
from tetra.devices import resolve_device, resolve_dtype
from tetra.errors import ConfigError
from tetra.infer.logprobs import right_pad, target_logprobs
from tetra.infer.sampling import SamplingConfig
from tetra.infer.text import generate_text

# lm-eval's own default for generation tasks that do not say how long an answer may be.
DEFAULT_MAX_GEN_TOKENS = 256


def _flag(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes")


@register_model("tetra")
class TetraLM(TemplateLM):
    """Scores and generates with a tetra checkpoint, Hugging Face folder or GGUF file. Tokenization follows lm-eval's
    `hf` backend (the tokenizer's own special tokens; BOS, else EOS, as the prefix of an empty context), so the same
    model scores the same through either."""

    def __init__(self, path: str, tokenizer: str | None = None, adapter: str | None = None, device: str = "auto",
                 dtype: str = "auto", batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKENS, add_bos_token: bool | str | None = None,
                 **_: Any) -> None:
        super().__init__()
        try:
            target = resolve_device(device)
        except ConfigError:  # lm-eval's CLI asks for cuda:0 by default; its hf backend falls back the same way
            warnings.warn(f"device {device!r} is not available here; using what is", stacklevel=2)
            target = resolve_device("auto")
        self.model = load_model_with_adapter(path, adapter, dtype=resolve_dtype(dtype, target), device=target).eval()
        self.tokenizer = load_tokenizer(Path(tokenizer or path))
        self._device = target
        self.batch_size = 8 if str(batch_size) == "auto" else int(batch_size)
        self._max_length = int(max_length or self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _flag(add_bos_token)
        if self.tokenizer.eos_id is None:
            raise ConfigError(f"The tokenizer of {path} has no EOS token; lm-eval needs one to end texts.")

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = True if self.add_bos_token is None else self.add_bos_token
            bos = self.tokenizer.bos_token
            if bos and string.startswith(bos):
                add_special_tokens = False  # the text already carries its BOS (a chat-templated prompt)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    @torch.inference_mode()
    def _score(self, batch: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """For (input tokens, number of continuation tokens at their end): the continuation's log-likelihood given
        what precedes it, and whether greedy decoding would have produced it."""
        ids = right_pad([tokens for tokens, _ in batch], self._device)
        hidden = self.model(ids[:, :-1], hidden_only=True)
        results = []
        for row, (tokens, count) in enumerate(batch):
            end = len(tokens) - 1
            scores, greedy = target_logprobs(self.model, hidden[row, end - count : end],
                                             ids[row, end - count + 1 : end + 1])
            results.append((scores.sum().item(), greedy))
        return results

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        """(context, continuation) token pairs, longest first in batches, answers in the order asked."""
        inputs = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):]
            inputs.append((whole, len(continuation)))
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(inputs)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for index, result in zip(chunk, self._score([inputs[i] for i in chunk]), strict=True):
                results[index] = result
                self.cache_hook.add_partial("loglikelihood", requests[index][0], result)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of the context length (each token scored once)."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for window in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *window))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, scores, strict=True):
            totals[owner] += score
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy or sampled continuations, cut at the first `until` string; batched by identical settings."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        answers: list[str] = [""] * len(requests)
        for members in groups.values():
            options = dict(requests[members[0]].args[1])
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            until.append(self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False))
            new_tokens = int(options.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(options.pop("temperature", 0.0)) if options.pop("do_sample", False) else 0.0
            sampling = SamplingConfig(temperature=temperature, top_p=float(options.pop("top_p", 1.0) or 1.0))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                prompts = [self._truncated_context(requests[i].args[0], new_tokens) for i in chunk]
                done = generate_text(self.model, self.tokenizer, prompts, new_tokens, sampling, seed=1234,
                                     stop_strings=until)
                for index, completion in zip(chunk, done, strict=True):
                    answers[index] = completion.text
                    self.cache_hook.add_partial("generate_until", requests[index].args, completion.text)
        return answers

    def _truncated_context(self, context: str, new_tokens: int) -> str:
        """The context, left-truncated so that it and the answer fit the context length."""
        ids = self.tok_encode(context)
        room = self.max_length - new_tokens
        return context if len(ids) <= room else self.tokenizer.decode(ids[-room:], skip_special_tokens=False)


def evaluate(model_path: str, tasks: list[str], include_path: str | None = None, limit: int | None = None,
             num_fewshot: int | None = None, batch_size: int = 8, log_samples: bool = False,
             **model_options: Any) -> dict[str, Any]:
    """lm-eval's simple_evaluate on a tetra model; tasks may come from include_path (local YAML files)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    known = set(manager.all_tasks)
    unknown = [task for task in tasks if task not in known]
    if unknown:
        raise ConfigError(f"lm-eval knows no task named {', '.join(unknown)}. Check the spelling, or pass "
                          "--include-path with the folder of your task YAML files.")
    model = TetraLM(model_path, batch_size=batch_size, **model_options)
    return simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                           log_samples=log_samples, bootstrap_iters=0)
