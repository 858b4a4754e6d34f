"""Parameter-efficient adapters applied to a model from outside: LoRA, and its PEFT file format.

Entry points: tetra.adapters.lora (apply_lora, merge_lora) and tetra.adapters.peft_io.
"""
