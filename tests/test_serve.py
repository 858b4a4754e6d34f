"""`tetra serve` driven by the official openai client: completions (strings, token lists, n, seed, stop, echo with
logprobs), chat, streaming, concurrent clients each getting their own tokens, and OpenAI-shaped 4xx errors that
never take the server down."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import SAMPLE_TEXT
from hf_factory import save_chat_tokenizer, save_tiny_base
from tetra.data.tokenizer import TextTokenizer
from tetra.infer.logprobs import logprobs_of
from tetra.infer.sampling import SamplingConfig
from tetra.infer.text import generate_text
from tetra.model.io import load_model
from tetra.serve.listen import BackgroundServer
from tetra.serve.server import Server

openai = pytest.importorskip("openai")

NAME = "tiny-chat"
PROMPTS = ["def add(a, b):", "import os\n", "The quick brown", "for name in"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    save_chat_tokenizer(root / "tokenizer", SAMPLE_TEXT)
    return save_tiny_base(root / "model", root / "tokenizer", max_positions=64)


@pytest.fixture(scope="module")
def served(folder):
    model, tokenizer = load_model(folder), TextTokenizer.load(folder)
    with BackgroundServer(Server(model, tokenizer, NAME, max_batch_size=3)) as url:
        yield url, model, tokenizer


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0)


def _alone(model, tokenizer, prompt: str, tokens: int, chat: bool = False, **options) -> str:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    completion = generate_text(model, tokenizer, [text], tokens, SamplingConfig(**options) if options else None,
                               add_special_tokens=not chat, seed=options.get("seed") if options else None)[0]
    return completion.text


def test_completions_equal_generation_alone(served, client):
    _, model, tokenizer = served
    answer = client.completions.create(model=NAME, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [choice.text for choice in answer.choices] == [_alone(model, tokenizer, p, 12) for p in PROMPTS]
    assert answer.usage.completion_tokens > 0 and answer.choices[0].finish_reason in ("length", "stop")
    ids = tokenizer.encode(PROMPTS[0])
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == answer.choices[0].text


def test_seed_n_and_stop(client, served):
    _, model, tokenizer = served
    first = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=10, temperature=1.0, seed=3, n=3)
    again = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=10, temperature=1.0, seed=3, n=3)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2] and len({c.text for c in first.choices}) > 1
    greedy = _alone(model, tokenizer, PROMPTS[1], 16)
    stop = greedy[3:5]
    stopped = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop])
    assert stopped.choices[0].text == greedy[: greedy.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 16  # generation stopped there, not just the text


def test_echo_logprobs_score_the_prompt(client, served):
    _, model, tokenizer = served
    ids = tokenizer.encode(PROMPTS[2])
    answer = client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=2)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.token_logprobs) == len(ids) + 1 and logprobs.token_logprobs[0] is None
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    expected = [score.logprob for score in logprobs_of(logits[:-1], torch.tensor(ids[1:]), 0)]
    assert logprobs.token_logprobs[1:-1] == pytest.approx(expected, abs=1e-4)
    assert answer.choices[0].text.startswith(tokenizer.decode(ids, skip_special_tokens=False))
    assert all(len(top) <= 2 for top in logprobs.top_logprobs[1:])
    scored_only = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert scored_only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)


def test_chat_and_streaming_equal_the_whole_answer(client, served):
    _, model, tokenizer = served
    messages = [{"role": "user", "content": "def add(a, b)?"}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.content == _alone(model, tokenizer, messages[0]["content"], 10, chat=True)
    assert whole.choices[0].message.role == "assistant"
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True) if chunk.choices]
    assert "".join(pieces) == whole.choices[0].message.content and len(pieces) > 2
    streamed = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=12, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == _alone(model, tokenizer, PROMPTS[3], 12)
    with_logprobs = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, temperature=0,
                                                   logprobs=True, top_logprobs=2)
    content = with_logprobs.choices[0].logprobs.content
    assert len(content) == with_logprobs.usage.completion_tokens
    assert all(entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) for entry in content)


def test_concurrent_clients_each_get_their_own_tokens(client, served):
    """More clients than KV-cache slots, streaming and not, at once: each answer equals its prompt alone."""
    _, model, tokenizer = served
    prompts = [PROMPTS[i % 4] + " " * (i // 4) for i in range(8)]
    expected = [_alone(model, tokenizer, p, 14) for p in prompts]

    def ask(index: int) -> str:
        if index % 2:
            stream = client.completions.create(model=NAME, prompt=prompts[index], max_tokens=14, temperature=0,
                                               stream=True)
            return "".join(chunk.choices[0].text for chunk in stream)
        answer = client.completions.create(model=NAME, prompt=prompts[index], max_tokens=14, temperature=0)
        return answer.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(8))) == expected


def _post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("payload,status,needle", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"model": NAME, "prompt": "a", "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"model": NAME, "prompt": "a", "max_tokens": 10_000}).encode(), 400, "max_tokens is 10000"),
    (json.dumps({"model": "gpt-9", "prompt": "a"}).encode(), 404, "does not exist"),
    (json.dumps({"model": NAME, "prompt": [10_000]}).encode(), 400, "vocabulary"),
    (json.dumps({"model": NAME}).encode(), 400, "prompt"),
])
def test_bad_requests_get_openai_errors_and_the_server_lives(served, payload, status, needle):
    url = served[0]
    code, body = _post(url + "/v1/completions", payload)
    assert code == status and needle in body["error"]["message"], body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    with urllib.request.urlopen(url + "/health") as response:
        assert json.loads(response.read())["status"] == "ok"


def test_client_errors_and_model_list(client):
    assert [model.id for model in client.models.list().data] == [NAME]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a"}], max_tokens=999)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[], max_tokens=2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_serves_and_refuses_a_taken_port(folder):
    port = _free_port()
    command = [sys.executable, "-m", "tetra", "serve", str(folder), "--port", str(port), "--name", NAME,
               "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as response:
                    assert json.loads(response.read())["model"] == NAME
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.2)
        taken = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert taken.returncode == 2 and "Cannot listen on" in taken.stderr and "Traceback" not in taken.stderr
    finally:
        process.terminate()
        process.wait(timeout=30)
