"""lm-eval parity: a locally defined task (YAML + local JSON lines, no download) scores the same through tetra's
backend as through lm-eval's own `hf` backend on the same tiny model, for loglikelihood (multiple choice),
loglikelihood_rolling (perplexity) and generate_until; and lm-eval's `local-completions` backend pointed at
`tetra serve` gives the same log-likelihood scores."""

from __future__ import annotations

import json

import pytest

from conftest import SAMPLE_TEXT
from hf_factory import save_chat_tokenizer, save_tiny_base
from tetra.cli import main

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [("def add(a, b):", [" return a + b", " import os", " print(name)"], 0),
             ("The quick brown", [" fox", " dog", " café"], 0),
             ("import os\nimport", [" sys", " os", " name"], 0),
             ("for name in", [" os.listdir('.'):", " range(3):", " b"], 1)]
TASKS = {
    "tiny_mc": """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "tiny_ppl": """task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/text.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "tiny_gen": """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    save_chat_tokenizer(root / "tokenizer", SAMPLE_TEXT)
    folder = save_tiny_base(root / "model", root / "tokenizer", max_positions=48)  # texts longer: rolling windows
    (root / "data").mkdir()
    (root / "data" / "mc.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (root / "data" / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXT[:3]))
    (root / "tasks").mkdir()
    for name, text in TASKS.items():
        (root / "tasks" / f"{name}.yaml").write_text(text.format(data=root / "data"))
    return root, folder


def _metrics(results: dict) -> dict[str, float]:
    return {f"{task}/{key}": value for task, values in results["results"].items() for key, value in values.items()
            if isinstance(value, float) and "stderr" not in key}


def _samples(results: dict) -> dict[tuple[str, int], list]:
    """Each document's raw numbers: (log-likelihood, is_greedy) per choice, a rolling log-likelihood, or text."""
    return {(task, sample["doc_id"]): sample["filtered_resps"] for task, samples in results["samples"].items()
            for sample in samples}


def _flatten(value) -> list:
    if isinstance(value, list | tuple):
        return [item for part in value for item in _flatten(part)]
    return [float(value) if isinstance(value, bool) else value]


def _assert_same_samples(ours: dict, reference: dict) -> None:
    assert set(ours) == set(reference)
    for key, expected in reference.items():
        flat_ours, flat_expected = _flatten(ours[key]), _flatten(expected)
        if isinstance(flat_expected[0], str):
            assert flat_ours == flat_expected, key
        else:
            assert flat_ours == pytest.approx(flat_expected, rel=1e-4, abs=1e-4), key


def _hf_results(root, folder, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32,max_length=48",
                           tasks=tasks, task_manager=TaskManager(include_path=str(root / "tasks")),
                           batch_size=4, bootstrap_iters=0, log_samples=True, device="cpu")


@pytest.fixture(scope="module")
def hf_results(setup):
    root, folder = setup
    return _hf_results(root, folder, list(TASKS))


@pytest.fixture(scope="module")
def hf_scores(hf_results):
    return _metrics(hf_results)


def test_tetra_backend_scores_equal_the_hf_backend(setup, hf_results, hf_scores):
    from tetra.eval.harness import evaluate

    root, folder = setup
    results = evaluate(str(folder), list(TASKS), include_path=str(root / "tasks"), batch_size=3, dtype="float32",
                       log_samples=True)
    _assert_same_samples(_samples(results), _samples(hf_results))
    ours = _metrics(results)
    assert set(ours) == set(hf_scores) and len(ours) >= 6
    for key, value in hf_scores.items():
        assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key


def test_cli_harness_and_unknown_task(setup, hf_scores, capsys):
    root, folder = setup
    assert main(["eval", "harness", str(folder), "--tasks", "tiny_mc,tiny_ppl", "--include-path",
                 str(root / "tasks"), "--dtype", "float32", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["tiny_mc"]["acc"] == pytest.approx(hf_scores["tiny_mc/acc,none"])
    assert printed["tiny_ppl"]["word_perplexity"] == pytest.approx(hf_scores["tiny_ppl/word_perplexity,none"],
                                                                   rel=1e-4)
    assert main(["eval", "harness", str(folder), "--tasks", "no_such_task", "--include-path",
                 str(root / "tasks")]) == 2
    assert "no_such_task" in capsys.readouterr().err


def test_local_completions_against_tetra_serve(setup, hf_results, hf_scores):
    """lm-eval's OpenAI-completions backend scores the multiple-choice task through the server's echo+logprobs."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from tetra.data.tokenizer import TextTokenizer
    from tetra.model.io import load_model
    from tetra.serve.listen import BackgroundServer
    from tetra.serve.server import Server

    root, folder = setup
    server = Server(load_model(folder), TextTokenizer.load(folder), "tiny", max_batch_size=4)
    with BackgroundServer(server) as url:
        results = simple_evaluate(
            model="local-completions", tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(root / "tasks")),
            model_args=f"model=tiny,base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={folder},"
                       "num_concurrent=2,max_retries=1,tokenized_requests=True",
            bootstrap_iters=0, log_samples=True)
    reference = {key: value for key, value in _samples(hf_results).items() if key[0] == "tiny_mc"}
    ours = {key: [[loglikelihood] for loglikelihood, _ in value] for key, value in _samples(results).items()}
    _assert_same_samples(ours, {key: [[loglikelihood] for loglikelihood, _ in value]
                                for key, value in reference.items()})
    scores = _metrics(results)
    for key in ("tiny_mc/acc,none", "tiny_mc/acc_norm,none"):
        assert scores[key] == pytest.approx(hf_scores[key]), key
