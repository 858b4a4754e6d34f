"""Model definitions and their storage: one decoder for many families, tetra and Hugging Face formats.

Entry points: ModelConfig, Transformer, KVCache, and load_model / save_model in tetra.model.io.
"""

from tetra.model.config import ModelConfig, RopeScaling
from tetra.model.kv_cache import KVCache
from tetra.model.transformer import Transformer

__all__ = ["KVCache", "ModelConfig", "RopeScaling", "Transformer"]
