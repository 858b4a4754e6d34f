"""tetra: pretrain, fine-tune, evaluate and sample GPT-style language models, from one CPU to many GPUs.

Entry points: the `tetra` console script (tetra.cli) and the packages model, data, infer.
"""

__version__ = "0.1.0"
