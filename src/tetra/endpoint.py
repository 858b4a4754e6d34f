"""Talking to an OpenAI-compatible HTTP endpoint (tetra serve, vLLM, a hosted API) with the standard library: the
judge of win rates and the instruction-data generator both need only a chat call and the model list.

Entry points: post_json(url, payload), first_model(base_url), chat(base_url, model, messages, **options).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from tetra.errors import ConfigError

REQUEST_TIMEOUT_S = 300


def post_json(url: str, payload: dict, timeout: float = REQUEST_TIMEOUT_S) -> dict:
    """POST a JSON body, return the JSON answer; an unreachable or refusing endpoint is a named error."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={
        "Content-Type": "application/json", "Authorization": "Bearer none"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:300]
        raise ConfigError(f"The endpoint {url} refused the request (HTTP {error.code}): {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        raise ConfigError(f"Cannot reach {url} ({getattr(error, 'reason', error)}). Start the server (for example "
                          "`tetra serve MODEL`) or fix the URL.") from None


def first_model(base_url: str) -> str:
    """The id of the first model {base_url}/models lists."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/models", timeout=30) as response:
            return json.loads(response.read())["data"][0]["id"]
    except (OSError, KeyError, IndexError, ValueError):
        raise ConfigError(f"Cannot list the models of {base_url} (GET /models). Name the model, or check that the "
                          "URL ends in /v1.") from None


def chat(base_url: str, model: str, messages: list[dict[str, str]], **options: Any) -> dict:
    """One /chat/completions call; returns the first choice (message, logprobs, finish_reason)."""
    answer = post_json(base_url.rstrip("/") + "/chat/completions", {"model": model, "messages": messages, **options})
    return answer["choices"][0]
