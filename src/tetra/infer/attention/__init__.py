"""Attention policies for decoding long contexts: dense, exact top-k, index-backed top-k, Loki and H2O.

Each policy is a KV cache (a subclass of tetra.model.KVCache) that decides which cached keys a decoding query
attends to; prefill stays dense. Entry points: AttentionPolicy and make_cache in tetra.infer.attention.policy.
"""
