"""Bad input gets one clear message naming the problem and the fix, exit code 2, no traceback, nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tetra.cli import main


def _fails(capsys, argv: list[str], *phrases: str) -> str:
    capsys.readouterr()  # drop what building the fixture printed
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for phrase in phrases:
        assert phrase in err, err
    return err


def _edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_folder_without_config(tmp_path, capsys):
    _fails(capsys, ["convert", "from-hf", str(tmp_path), str(tmp_path / "out")], "neither config.json")
    _fails(capsys, ["generate", str(tmp_path / "nowhere"), "--prompt", "x"], "does not exist")


def test_unsupported_architecture_is_named_with_the_supported_list(hf_folder, tmp_path, capsys):
    _, folder = hf_folder("llama-gqa1")
    _edit_config(folder, model_type="bert", architectures=["BertForMaskedLM"])
    _fails(capsys, ["convert", "from-hf", str(folder), str(tmp_path / "out")], "'bert'",
           "llama, qwen2, mistral, gpt2, opt")


def test_shapes_that_do_not_match_the_config_are_named(hf_folder, tmp_path, capsys):
    _, folder = hf_folder("llama-gqa2")
    _edit_config(folder, intermediate_size=128)
    _fails(capsys, ["convert", "from-hf", str(folder), str(tmp_path / "out")],
           "model.layers.0.mlp.gate_proj.weight is [96, 64] but the config implies [128, 64]")
    assert not (tmp_path / "out").exists()


def test_weights_from_another_architecture(hf_folder, tmp_path, capsys):
    _, gpt2 = hf_folder("gpt2")
    _, llama = hf_folder("llama-gqa1")
    (llama / "model.safetensors").write_bytes((gpt2 / "model.safetensors").read_bytes())
    _fails(capsys, ["convert", "from-hf", str(llama), str(tmp_path / "out")], "missing tensors", "unexpected tensors")


def test_corrupt_and_pickled_weights(hf_folder, tmp_path, capsys):
    _, folder = hf_folder("opt")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _fails(capsys, ["convert", "from-hf", str(folder), str(tmp_path / "o")], "not a readable safetensors", "truncated")
    weights.rename(folder / "pytorch_model.bin")
    _fails(capsys, ["convert", "from-hf", str(folder), str(tmp_path / "out")], "never unpickles", "pytorch_model.bin")


def test_malformed_config_json(hf_folder, tmp_path, capsys):
    _, folder = hf_folder("qwen2")
    (folder / "config.json").write_text("{not json")
    _fails(capsys, ["convert", "from-hf", str(folder), str(tmp_path / "out")], "config.json is not valid JSON")


def test_refused_layouts_say_why(hf_folder, tmp_path, capsys):
    _, folder = hf_folder("opt")
    _edit_config(folder, do_layer_norm_before=False, word_embed_proj_dim=32)
    _fails(capsys, ["convert", "from-hf", str(folder), str(tmp_path / "o")], "opt-350m", "not supported")
    _, folder = hf_folder("llama-gqa2")
    _edit_config(folder, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    _fails(capsys, ["convert", "from-hf", str(folder), str(tmp_path / "o")], "'yarn' is not supported")


def test_missing_tokenizer_for_generate(hf_folder, capsys):
    _, folder = hf_folder("mistral")
    _fails(capsys, ["generate", str(folder), "--prompt", "hello"], "No tokenizer found", "tokenizer.json")


def test_invalid_sampling_options(tiny_checkpoint, capsys):
    _fails(capsys, ["generate", str(tiny_checkpoint), "--prompt", "x", "--top-p", "0"], "--top-p must be in (0, 1]")
    _fails(capsys, ["generate", str(tiny_checkpoint), "--prompt", "x", "--max-new-tokens", "0"], "at least 1")


def test_existing_output_is_never_overwritten(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    _fails(capsys, ["convert", "to-hf", str(tiny_checkpoint), str(out)], "already exists", "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    assert main(["convert", "to-hf", str(tiny_checkpoint), str(out), "--overwrite"]) == 0
    assert (out / "config.json").exists() and not (out / "precious.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("argv", [["generate", "/nonexistent/model", "--prompt", "x"]])
def test_console_script_exits_2_without_traceback(argv):
    result = subprocess.run([sys.executable, "-m", "tetra", *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
