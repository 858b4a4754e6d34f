"""LoRA: adapters equal PEFT's both ways (tetra -> peft.PeftModel and peft -> tetra), merging keeps the function,
training touches only the adapters and resumes exactly, checkpoints are PEFT adapter folders, and bad targets or
adapters of another model are named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import SAMPLE_TEXT
from hf_factory import VOCAB, build_hf_model
from tetra.adapters.lora import LoRAConfig, apply_lora, has_lora, merge_lora
from tetra.adapters.peft_io import load_model_with_adapter, load_peft_adapter, save_peft_adapter
from tetra.cli import main
from tetra.errors import CheckpointError, ConfigError
from tetra.model.io import load_model

peft = pytest.importorskip("peft")


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(4))


def _randomize_b(model: torch.nn.Module, seed: int = 1) -> None:
    """PEFT and tetra both start B at zero, which would make every comparison trivially pass."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("variant", ["llama-gqa2", "qwen2-tied", "opt"])
def test_tetra_adapter_loads_in_peft_with_equal_logits(variant, hf_folder, tmp_path):
    _, base = hf_folder(variant)
    model = load_model(base)
    config = LoRAConfig(rank=4, alpha=8, targets=["q", "v", "up", "down"] if variant != "opt" else ["q", "k", "o"])
    apply_lora(model, config)
    _randomize_b(model)
    (tmp_path / "adapter").mkdir()
    save_peft_adapter(model, tmp_path / "adapter", config, base)
    reference = peft.PeftModel.from_pretrained(build_hf_model(variant), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (model.eval()(_ids()) - reference(_ids()).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_tetra_with_equal_logits(rslora, hf_folder, tmp_path):
    _, base = hf_folder("llama-gqa2")
    reference = peft.get_peft_model(build_hf_model("llama-gqa2"), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj"], use_rslora=rslora))
    _randomize_b(reference)
    reference.save_pretrained(tmp_path / "adapter")
    model = load_model(base)
    adapted = load_peft_adapter(model, tmp_path / "adapter")
    assert len(adapted) == 6 and has_lora(model)
    with torch.no_grad():
        expected = reference.eval()(_ids()).logits
        assert (model.eval()(_ids()) - expected).abs().max().item() <= 1e-5
        merged = load_model_with_adapter(base, tmp_path / "adapter")
        assert not has_lora(merged)
        assert (merged(_ids()) - expected).abs().max().item() <= 1e-5


def test_merge_keeps_the_function_and_exports_to_transformers(hf_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    _, base = hf_folder("llama-gqa2")
    model = load_model(base)
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=["all-linear"]))
    _randomize_b(model)
    with torch.no_grad():
        before = model.eval()(_ids())
        merge_lora(model)
        assert not has_lora(model)
        assert (model(_ids()) - before).abs().max().item() <= 1e-5
    from tetra.model.io import save_hf_model

    save_hf_model(model, tmp_path / "merged")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (exported(_ids()).logits - before).abs().max().item() <= 1e-5


def test_targets_matching_nothing_list_the_layer_names(hf_folder):
    _, base = hf_folder("llama-gqa2")
    with pytest.raises(ConfigError) as caught:
        apply_lora(load_model(base), LoRAConfig(rank=2, targets=["c_attn"]))
    assert "c_attn" in str(caught.value) and "down, gate, head, k, o, q, up, v" in str(caught.value)


def test_adapter_of_another_model_names_the_tensors(hf_folder, tmp_path):
    _, small = hf_folder("llama-gqa2")
    model = load_model(small)
    apply_lora(model, LoRAConfig(rank=2, targets=["q"]))
    (tmp_path / "adapter").mkdir()
    save_peft_adapter(model, tmp_path / "adapter", LoRAConfig(rank=2, targets=["q"]), small)
    _, other = hf_folder("llama-bias-headdim")  # head_dim 24: q is [96, 64], not [64, 64]
    with pytest.raises(CheckpointError) as caught:
        load_peft_adapter(load_model(other), tmp_path / "adapter")
    assert "model.layers.0.self_attn.q_proj.lora_B" in str(caught.value) and "another base model" in str(caught.value)
    with pytest.raises(CheckpointError) as caught:
        load_peft_adapter(load_model(hf_folder("gpt2")[1]), tmp_path / "adapter")
    assert "gpt2 model does not have" in str(caught.value)


def test_gpt2_adapters_are_refused_in_peft_format(hf_folder, tmp_path):
    _, base = hf_folder("gpt2")
    model = load_model(base)
    apply_lora(model, LoRAConfig(rank=2, targets=["q"]))
    with pytest.raises(CheckpointError) as caught:
        save_peft_adapter(model, tmp_path, LoRAConfig(rank=2, targets=["q"]), base)
    assert "tetra convert to-hf" in str(caught.value)


@pytest.fixture
def lora_run(tmp_path):
    """A tiny base model saved as a Hugging Face folder, data prepared with its tokenizer, and a LoRA run config."""
    from hf_factory import save_tiny_base
    from tetra.data.tokenizer import train_bpe

    train_bpe(SAMPLE_TEXT, vocab_size=300).save(tmp_path / "tokenizer")
    save_tiny_base(tmp_path / "base", tmp_path / "tokenizer", max_positions=64)
    (tmp_path / "corpus.txt").write_text("".join(SAMPLE_TEXT))
    assert main(["data", "prepare", str(tmp_path / "corpus.txt"), "--tokenizer", str(tmp_path / "base"),
                 "--out", str(tmp_path / "data"), "--val-fraction", "0"]) == 0
    config = tmp_path / "lora.toml"
    config.write_text(f'[init]\ncheckpoint = "{tmp_path / "base"}"\n[data]\npath = "{tmp_path / "data"}"\n'
                      'seq_len = 32\n[train]\nmax_steps = 6\nbatch_size = 4\nlr = 1e-2\nwarmup_steps = 1\n'
                      '[lora]\nrank = 4\nalpha = 8\ntargets = ["q", "v", "down"]\n[eval]\nevery = 0\n'
                      f'[run]\ndir = "{tmp_path / "run"}"\nlog_every = 1\ncheckpoint_every = 3\n')
    return tmp_path, config


def test_lora_training_touches_only_adapters_and_resumes_exactly(lora_run, capsys):
    from transformers import AutoModelForCausalLM

    root, config = lora_run
    assert main(["train", str(config), "--no-progress"]) == 0
    checkpoint = root / "run" / "checkpoints" / "step-0000006"
    files = {path.name for path in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors"} <= files
    assert "model.safetensors" not in files
    from safetensors.torch import load_file

    optimizer_keys = {key.rsplit("/", 1)[0] for key in load_file(checkpoint / "optimizer.safetensors")}
    assert optimizer_keys and all(".lora_" in key for key in optimizer_keys)
    trained = load_model_with_adapter(checkpoint, merge=False)
    base = load_model(root / "base")
    for name, parameter in base.named_parameters():  # the base weights are bit-identical
        assert torch.equal(dict(trained.named_parameters())[name], parameter), name
    ids = torch.randint(3, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), checkpoint).eval()
    with torch.no_grad():
        merged = load_model_with_adapter(checkpoint)
        assert (merged(ids) - reference(ids).logits).abs().max().item() <= 1e-5
        assert (merged(ids) - base(ids)).abs().max().item() > 1e-3  # training changed the function
    first = [json.loads(line)["loss"] for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(checkpoint)
    assert main(["train", str(config), "--resume", "auto", "--no-progress"]) == 0
    again = [json.loads(line)["loss"] for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert again == first
    assert main(["generate", str(checkpoint), "--prompt", "def", "--max-new-tokens", "4", "--json"]) == 0
    assert main(["convert", "to-hf", str(checkpoint), str(root / "merged"), "--json"]) == 0
    capsys.readouterr()
    exported = AutoModelForCausalLM.from_pretrained(root / "merged").eval()
    with torch.no_grad():
        assert (exported(ids).logits - reference(ids).logits).abs().max().item() <= 1e-5


def test_lora_run_with_a_target_that_matches_nothing(lora_run, capsys):
    root, config = lora_run
    assert main(["train", str(config), 'lora.targets=["c_fc"]', "--no-progress"]) == 2
    message = capsys.readouterr().err
    assert "c_fc" in message and "Linear layers are named" in message and "Traceback" not in message
    assert not (root / "run" / "checkpoints").exists()


def test_lora_adapter_only_folder_without_its_base(lora_run, tmp_path, capsys):
    root, config = lora_run
    assert main(["train", str(config), "train.max_steps=1", "--no-progress"]) == 0
    checkpoint = root / "run" / "checkpoints" / "step-0000001"
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved)
    adapter_config = json.loads((moved / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(adapter_config))
    capsys.readouterr()
    assert main(["generate", str(moved), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    assert "--adapter" in capsys.readouterr().err
    assert main(["generate", str(root / "base"), "--adapter", str(moved), "--prompt", "x", "--max-new-tokens", "2",
                 "--json"]) == 0


def test_lora_config_problems_are_listed():
    from tetra.config import build_run_config

    with pytest.raises(ConfigError) as caught:
        build_run_config({"data": {"path": "x"}, "lora": {"rank": -1, "dropout": 1.5}, "parallel": {"row": 2}})
    message = str(caught.value)
    assert "lora.rank" in message and "lora.dropout" in message





@pytest.mark.parametrize(("launch", "shared"), [
    (["parallel.strategy=ddp", "train.batch_size=4"], []),
    (["parallel.row=2", "parallel.gemm_layout=in_out", "train.batch_size=8"], ["train.neftune.alpha=5"]),
    (["parallel.depth=2", "train.batch_size=4"], [])], ids=["ddp", "row-neftune", "depth"])
def test_lora_on_two_processes_matches_one_and_resumes_on_one(lora_run, launch, shared):
    """DDP and the 4D grid (adapters split with their base) train the adapters like one process with the whole
    batch (row=2 does not split the batch, so each rank takes all 8 rows, and NEFTune's noise is one process's);
    the checkpoint is the same PEFT adapter folder, and one process resumes from it exactly."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tetra.parallel.launch import free_port

    root, config = lora_run
    common = ["train.precision=fp32", "train.max_steps=4", "run.checkpoint_every=2", *shared]
    assert main(["train", str(config), *common, "train.batch_size=8", f"run.dir={root / 'one'}",
                 "--no-progress"]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "tetra", "train", str(config), *common, *launch,
               f"run.dir={root / 'two'}", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    def losses(name: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (root / name / "metrics.jsonl").read_text().splitlines()]

    assert losses("two") == pytest.approx(losses("one"), rel=1e-5)
    saved = {name: load_file(root / name / "checkpoints" / "step-0000002" / "adapter_model.safetensors")
             for name in ("one", "two")}
    assert sorted(saved["two"]) == sorted(saved["one"])
    for key, value in saved["one"].items():
        assert torch.allclose(saved["two"][key], value, rtol=1e-4, atol=1e-6), key
    shutil.copytree(root / "two" / "checkpoints" / "step-0000002", root / "resumed" / "checkpoints" / "step-0000002")
    assert main(["train", str(config), *common, "train.batch_size=8", f"run.dir={root / 'resumed'}",
                 "--resume", "auto", "--no-progress"]) == 0
    assert losses("resumed") == pytest.approx(losses("one")[2:], rel=1e-5)  # steps 3 and 4


def test_lora_needs_a_pretrained_base_and_peft_names(hf_folder):
    from tetra.config import build_run_config

    with pytest.raises(ConfigError) as caught:
        build_run_config({"data": {"path": "x"}, "lora": {"rank": 4}})
    assert "init.checkpoint" in str(caught.value)
    model = load_model(hf_folder("gpt2")[1])
    apply_lora(model, LoRAConfig(rank=2, targets=["q"]))
    from tetra.adapters.peft_io import check_peft_names

    with pytest.raises(ConfigError, match="no one-to-one PEFT module names"):
        check_peft_names(model)
    tied = load_model(hf_folder("llama-gqa4-tied")[1])
    with pytest.raises(ConfigError, match="ties it to the token embedding"):
        apply_lora(tied, LoRAConfig(rank=2, targets=["q", "head"]))
