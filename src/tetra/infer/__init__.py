"""Inference: sampling with a KV cache, token- and text-level generation.

Entry points: tetra.infer.generate.generate_ids and tetra.infer.text.generate_text.
"""
