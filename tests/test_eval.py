"""llmkd's evaluation: the offline tasks and their data, lm-eval on tiny models (values checked against direct
computations), classifiers with evaluate's accuracy/F1, the retention table, and the errors of ``llmkd eval``."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llmkd.cli import main as cli_main
from llmkd.evaluation import (
    EvaluationError, evaluate_models, evaluate_paths, local_lm_tasks, markdown_table, validate_tasks,
)
from llmkd.evaluation.results import combine, retention, retention_ratio, rows
from llmkd.evaluation.tasks import _IgnoreTags, lm_tasks_dir, task_manager
from llmkd.quickstart.evaluate import exact_match as direct_exact_match

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "llmkd", "assets", "quickstart", "teacher")
STUDENT_CONFIG = os.path.join(ROOT, "llmkd", "assets", "quickstart", "student")
DATA = os.path.join(ROOT, "eval", "data")
LOCAL_TASKS = ["llmkd_addition_exact_match", "llmkd_addition_choice", "llmkd_addition_perplexity"]
LIMIT = 12


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# ------------------------------------------------------------------------------------------- tasks and data
def test_three_offline_tasks_of_the_three_output_types():
    assert set(LOCAL_TASKS) <= set(local_lm_tasks())
    kinds = {}
    for name in os.listdir(lm_tasks_dir()):
        if name.endswith(".yaml"):
            with open(os.path.join(lm_tasks_dir(), name)) as handle:
                spec = yaml.load(handle, Loader=_IgnoreTags)
            kinds[spec["task"]] = spec["output_type"]
    assert kinds["llmkd_addition_exact_match"] == "generate_until"
    assert kinds["llmkd_addition_choice"] == "multiple_choice"
    assert kinds["llmkd_addition_perplexity"] == "loglikelihood_rolling"


def test_eval_data_is_what_the_script_writes(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_eval_tasks", os.path.join(ROOT, "scripts",
                                                                                   "make_eval_tasks.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check"]) == 0  # the committed files are what the script writes
    assert script.build() == script.build()  # deterministic
    monkeypatch.setattr(script, "DATA_DIR", str(tmp_path))
    assert script.main([]) == 0
    for name in os.listdir(DATA):
        assert (tmp_path / name).read_bytes() == open(os.path.join(DATA, name), "rb").read()
    (tmp_path / "addition_choice.jsonl").write_text("{}\n")
    assert script.main(["--check"]) == 1  # a stale file is reported


def test_eval_data_splits():
    exact = read_jsonl(os.path.join(DATA, "addition_exact_match.jsonl"))
    choice = read_jsonl(os.path.join(DATA, "addition_choice.jsonl"))
    perplexity = read_jsonl(os.path.join(DATA, "addition_perplexity.jsonl"))
    # the generation task is the quickstart's held-out file, row for row
    assert exact == read_jsonl(os.path.join(ROOT, "recipes", "data", "addition_held_out.jsonl"))
    prompts = [{r["prompt"] for r in exact}, {r["prompt"] for r in choice},
               {r["text"].split("=")[0] + "=" for r in perplexity}]
    assert all(len(p) == 200 for p in prompts)
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    for row in choice:
        a, b = (int(x[::-1]) for x in row["prompt"].rstrip("=").split("+"))
        assert len(set(row["choices"])) == 4
        assert row["choices"][row["label"]] == str(a + b)[::-1]
    for row in perplexity:
        left, answer = row["text"].split("=")
        a, b = (int(x[::-1]) for x in left.split("+"))
        assert answer == str(a + b)[::-1]


def test_unknown_task_names_the_closest_one():
    with pytest.raises(EvaluationError, match="did you mean 'llmkd_addition_exact_match'"):
        task_manager(["llmkd_addition_exact_mach"])
    # lm-eval's own tasks are known too (their data is fetched when they run), and classification tasks
    assert validate_tasks("arc_easy, llmkd_addition_choice,llmkd_sentiment,eval_dataset") == [
        "arc_easy", "llmkd_addition_choice", "llmkd_sentiment", "eval_dataset"]


def test_extra_task_folder_with_lm_eval_own_json_loader(tmp_path):
    """--include_path: a user's task YAML in lm-eval's usual form (dataset_path: json, absolute data_files)."""
    rows = read_jsonl(os.path.join(DATA, "addition_exact_match.jsonl"))[:3]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "mine.yaml").write_text(yaml.safe_dump({
        "task": "my_addition", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{completion}}", "target_delimiter": "",
        "generation_kwargs": {"until": ["+", "="], "max_gen_toks": 5, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}))
    results = evaluate_paths(TEACHER, "my_addition", output_dir=str(tmp_path / "out"), include_path=str(folder),
                             device="cpu")
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER, use_safetensors=True)
    expected = direct_exact_match(teacher, AutoTokenizer.from_pretrained(TEACHER), rows)
    assert results["student"]["scores"]["my_addition"]["metrics"]["exact_match"] == pytest.approx(expected)


# ---------------------------------------------------------------------------------- lm-eval on tiny models
@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER, use_safetensors=True)
    student = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(STUDENT_CONFIG))
    return student, teacher, tokenizer


@pytest.fixture(scope="module")
def results(models, tmp_path_factory):
    student, teacher, tokenizer = models
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))  # the task YAMLs must find their data from any directory
    try:
        return [evaluate_models(student, tokenizer, LOCAL_TASKS, teacher=teacher, limit=LIMIT, batch_size=8)
                for _ in range(2)]
    finally:
        os.chdir(here)


def _rolling_bytes_perplexity(model, tokenizer, texts: list[str]) -> float:
    """exp(-sum of log p(token | previous tokens) / UTF-8 bytes), every text scored after the EOS token as lm-eval
    does (its prefix token when there is no BOS)."""
    total, size = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(text)["input_ids"]])
            logp = model(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])
            total += logp.sum().item()
            size += len(text.encode())
    return math.exp(-total / size)


def test_lm_eval_scores_the_three_local_tasks(results, models):
    student, teacher, tokenizer = models
    first = results[0]
    for part in ("student", "teacher"):
        scores = first[part]["scores"]
        assert list(scores) == LOCAL_TASKS
        assert 0.0 <= scores["llmkd_addition_exact_match"]["metrics"]["exact_match"] <= 1.0
        assert 0.0 <= scores["llmkd_addition_choice"]["metrics"]["acc"] <= 1.0
        assert 0.0 <= scores["llmkd_addition_choice"]["metrics"]["acc_norm"] <= 1.0
        ppl = scores["llmkd_addition_perplexity"]["metrics"]
        assert ppl["byte_perplexity"] >= 1.0
        assert ppl["bits_per_byte"] == pytest.approx(math.log2(ppl["byte_perplexity"]), rel=1e-9)
        assert all(entry["samples"] == LIMIT for entry in scores.values())
    # the trained teacher adds; the untrained student does not
    assert first["teacher"]["scores"]["llmkd_addition_exact_match"]["metrics"]["exact_match"] >= 0.9
    assert first["student"]["scores"]["llmkd_addition_exact_match"]["metrics"]["exact_match"] == 0.0
    assert first["teacher"]["scores"]["llmkd_addition_choice"]["metrics"]["acc_norm"] > \
        first["student"]["scores"]["llmkd_addition_choice"]["metrics"]["acc_norm"]


def test_lm_eval_values_match_direct_computations(results, models):
    student, teacher, tokenizer = models
    rows_ = read_jsonl(os.path.join(DATA, "addition_exact_match.jsonl"))[:LIMIT]
    texts = [r["text"] for r in read_jsonl(os.path.join(DATA, "addition_perplexity.jsonl"))[:LIMIT]]
    for part, model in (("student", student), ("teacher", teacher)):
        scores = results[0][part]["scores"]
        assert scores["llmkd_addition_exact_match"]["metrics"]["exact_match"] == pytest.approx(
            direct_exact_match(model, tokenizer, rows_))
        assert scores["llmkd_addition_perplexity"]["metrics"]["byte_perplexity"] == pytest.approx(
            _rolling_bytes_perplexity(model, tokenizer, texts), rel=1e-4)


def test_lm_eval_is_reproducible(results):
    assert results[0] == results[1]


def test_retention_of_the_evaluation(results):
    first = results[0]
    student, teacher = first["student"]["scores"], first["teacher"]["scores"]
    em = first["retention"]["llmkd_addition_exact_match"]["exact_match"]
    assert em == student["llmkd_addition_exact_match"]["metrics"]["exact_match"] / \
        teacher["llmkd_addition_exact_match"]["metrics"]["exact_match"]
    # lower is better for perplexity: retention is log(teacher) / log(student), the cross-entropies' ratio, which is
    # the bits-per-byte retention of the same evaluation
    ppl = first["retention"]["llmkd_addition_perplexity"]["byte_perplexity"]
    assert ppl == pytest.approx(math.log(teacher["llmkd_addition_perplexity"]["metrics"]["byte_perplexity"])
                                / math.log(student["llmkd_addition_perplexity"]["metrics"]["byte_perplexity"]))
    assert ppl == pytest.approx(first["retention"]["llmkd_addition_perplexity"]["bits_per_byte"], rel=1e-6)


# ------------------------------------------------------------------------------------------- the retention table
def _scores(values: dict[str, dict[str, float]], lower: tuple[str, ...] = ()) -> dict:
    return {task: {"metrics": metrics, "higher_is_better": {m: m not in lower for m in metrics}, "samples": 10,
                   "kind": "lm-eval"} for task, metrics in values.items()}


def test_retention_ratio_rules():
    assert retention_ratio(0.6, 0.8, higher_is_better=True) == pytest.approx(0.75)
    assert retention_ratio(20.0, 10.0, higher_is_better=False) == pytest.approx(0.5)
    assert retention_ratio(0.3, 0.0, higher_is_better=True) is None
    assert retention_ratio(float("nan"), 0.5, higher_is_better=True) is None


def test_a_perplexity_is_retained_as_its_cross_entropy():
    """The measured case of a new user: byte perplexity 15.1 (student) vs 2.516e4 (teacher) showed retention
    1665.6 while bits per byte of the same run (log2 of it) showed 3.73. Both now say the cross-entropy ratio."""
    import math

    student_ppl, teacher_ppl = 15.1074, 2.516e4
    by_perplexity = retention_ratio(student_ppl, teacher_ppl, higher_is_better=False, metric="byte_perplexity")
    by_bits = retention_ratio(math.log2(student_ppl), math.log2(teacher_ppl), higher_is_better=False,
                              metric="bits_per_byte")
    assert by_perplexity == pytest.approx(by_bits, rel=1e-12) == pytest.approx(3.732, abs=1e-3)
    assert retention_ratio(1.0, 5.0, higher_is_better=False, metric="word_perplexity") is None  # log 1 = 0


def test_retention_table():
    student = _scores({"gsm": {"exact_match": 0.3}, "ppl": {"byte_perplexity": 4.0}, "only_student": {"acc": 1.0}},
                      lower=("byte_perplexity",))
    teacher = _scores({"gsm": {"exact_match": 0.6}, "ppl": {"byte_perplexity": 2.0}}, lower=("byte_perplexity",))
    assert retention(student, teacher) == {"gsm": {"exact_match": 0.5}, "ppl": {"byte_perplexity": 0.5}}
    results = combine({"model": "s", "scores": student}, {"model": "t", "scores": teacher}, {})
    table = markdown_table(results).splitlines()
    assert table[0] == "| task | metric | student | teacher | retention | n |"
    assert "| gsm | exact_match ↑ | 0.3000 | 0.6000 | 0.5000 | 10 |" in table
    assert "| ppl | byte_perplexity ↓ | 4.0000 | 2.0000 | 0.5000 | 10 |" in table
    assert "| only_student | acc ↑ | 1.0000 | n/a | n/a | 10 |" in table
    assert [r["task"] for r in rows(results)] == ["gsm", "ppl", "only_student"]
    alone = combine({"model": "s", "scores": student}, None, {})
    assert markdown_table(alone).splitlines()[0] == "| task | metric | student | n |"


# ------------------------------------------------------------------------------------------------ llmkd eval
def test_cli_eval_writes_results_and_table(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_main(["eval", "--model", TEACHER, "--teacher", TEACHER, "--tasks", "llmkd_addition_exact_match",
                     "--limit", "4", "--output_dir", str(out), "--device", "cpu"])
    assert code == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["student"]["model"] == TEACHER and saved["teacher"]["model"] == TEACHER
    assert saved["retention"] == {"llmkd_addition_exact_match": {"exact_match": 1.0}}
    assert saved["settings"]["limit"] == 4
    table = (out / "results.md").read_text()
    assert table == markdown_table(saved)
    assert "| llmkd_addition_exact_match | exact_match ↑ | 1.0000 | 1.0000 | 1.0000 | 4 |" in table
    assert table in capsys.readouterr().out


def test_cli_eval_errors_are_clear(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli_main(["eval", "--model", str(missing), "--tasks", "llmkd_addition_choice"]) == 2
    assert "does not exist" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert cli_main(["eval", "--model", str(empty), "--tasks", "llmkd_addition_choice"]) == 2
    assert "holds no safetensors weights" in capsys.readouterr().err

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({}, pickled / "pytorch_model.bin")
    assert cli_main(["eval", "--model", str(pickled), "--tasks", "llmkd_addition_choice"]) == 2
    assert "pickle weights (pytorch_model.bin)" in capsys.readouterr().err

    assert cli_main(["eval", "--model", TEACHER, "--tasks", "llmkd_addition_choise", "--limit", "2",
                     "--output_dir", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert "Unknown evaluation task 'llmkd_addition_choise'" in error and "llmkd_addition_choice" in error
    assert not (tmp_path / "x").exists()

    with pytest.raises(EvaluationError, match="classification task"):
        evaluate_paths(TEACHER, "llmkd_sentiment", limit=2, output_dir=str(tmp_path / "y"))


def test_lora_student_folder_is_evaluated_with_its_adapter_merged(tmp_path):
    """llmkd train saves a LoRA student as its adapter only; llmkd eval loads the base it names and merges it."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(TEACHER, use_safetensors=True)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))  # random adapter: not the base any more
    lora.save_pretrained(str(tmp_path / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    tokenizer.save_pretrained(str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter" / "config.json").exists()
    results = evaluate_paths(str(tmp_path / "adapter"), "llmkd_addition_perplexity", limit=6,
                             output_dir=str(tmp_path / "out"), device="cpu")
    texts = [r["text"] for r in read_jsonl(os.path.join(DATA, "addition_perplexity.jsonl"))[:6]]
    merged = lora.merge_and_unload().eval()
    assert results["student"]["scores"]["llmkd_addition_perplexity"]["metrics"]["byte_perplexity"] == \
        pytest.approx(_rolling_bytes_perplexity(merged, tokenizer, texts), rel=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(TEACHER, use_safetensors=True).eval()
    assert _rolling_bytes_perplexity(plain, tokenizer, texts) != pytest.approx(
        _rolling_bytes_perplexity(merged, tokenizer, texts), rel=1e-4)  # the adapter mattered
