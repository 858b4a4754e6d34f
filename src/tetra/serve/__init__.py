"""The OpenAI-compatible HTTP server over infer/: request validation, continuous batching, streaming."""
