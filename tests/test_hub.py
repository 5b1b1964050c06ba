"""Publishing end to end against a fake Hub on loopback (tests/fake_hub.py): every file arrives byte-identical with
the model card's metadata; push_to_hub=True in a recipe gives the same card; the token is never written or logged;
a failed upload reports the server's error and leaves the output folder untouched."""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pytest
import yaml
from fake_hub import FakeHub
from huggingface_hub import ModelCard, constants
from utils import make_tokenizer, tiny_llama

from llmkd import DistillConfig, DistillTrainer
from llmkd.cli import main as cli_main
from llmkd.hub import PublishError, build_model_card, files_to_upload, publish
from llmkd.recipes import RecipeError, load_config
from llmkd.report import write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "llmkd", "assets", "quickstart")
TOKEN = "hf_llmkdTestToken0123456789abcdefXYZ"


@pytest.fixture
def hub(monkeypatch):
    """A fake Hub; the token in the environment only (as HF_TOKEN), offline mode off for this test."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", "/nonexistent-llmkd-hf-home")  # no stored login is read
    with FakeHub(TOKEN) as server:
        yield server


def make_output_dir(folder) -> str:
    """A finished run's output folder, as llmkd train leaves it (plus things that must not be published)."""
    folder = str(folder)
    tokenizer = make_tokenizer()
    tiny_llama(len(tokenizer), seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    summary = {"method": "taid", "student": "Qwen/Qwen2.5-0.5B", "student_initialisation": "pretrained weights",
               "teacher": "Qwen/Qwen2.5-7B-Instruct", "datasets": ["trl-lib/Capybara", "/data/local.jsonl"],
               "hyperparameters": {"t_start": 0.4, "alpha": 0.0005, "kd_ratio": 1.0, "learning_rate": 2e-5}}
    with open(os.path.join(folder, "llmkd_run.json"), "w") as handle:
        json.dump(summary, handle)
    with open(os.path.join(folder, "llmkd_recipe.yaml"), "w") as handle:
        yaml.safe_dump({"method": "taid", "model_name_or_path": "Qwen/Qwen2.5-0.5B", "t_start": 0.4}, handle)
    results = {"student": {"model": folder, "scores": {
        "llmkd_addition_exact_match": {"metrics": {"exact_match": 0.25}, "higher_is_better": {"exact_match": True},
                                       "samples": 8, "kind": "lm-eval"},
        "llmkd_addition_perplexity": {"metrics": {"byte_perplexity": 3.5}, "higher_is_better":
                                      {"byte_perplexity": False}, "samples": 8, "kind": "lm-eval"}}},
        "teacher": {"model": "t", "scores": {
            "llmkd_addition_exact_match": {"metrics": {"exact_match": 0.5}, "higher_is_better": {"exact_match": True},
                                           "samples": 8, "kind": "lm-eval"},
            "llmkd_addition_perplexity": {"metrics": {"byte_perplexity": 1.75}, "higher_is_better":
                                          {"byte_perplexity": False}, "samples": 8, "kind": "lm-eval"}}},
        "retention": {"llmkd_addition_exact_match": {"exact_match": 0.5},
                      "llmkd_addition_perplexity": {"byte_perplexity": 0.5}}, "settings": {"limit": 8}}
    with open(os.path.join(folder, "results.json"), "w") as handle:
        json.dump(results, handle)
    write_report(folder, [{"loss": 2.0, "taid_t": 0.4, "step": 1}, {"loss": 1.0, "taid_t": 0.5, "step": 2}],
                 results=results, summary=summary)
    # never published: pickles, checkpoints, Trainer state
    with open(os.path.join(folder, "training_args.bin"), "wb") as handle:
        handle.write(b"pickle")
    os.makedirs(os.path.join(folder, "checkpoint-2"))
    with open(os.path.join(folder, "checkpoint-2", "model.safetensors"), "wb") as handle:
        handle.write(b"old")
    return folder


def snapshot(folder: str) -> dict[str, tuple[str, int]]:
    state = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                state[os.path.relpath(path, folder)] = (hashlib.sha256(handle.read()).hexdigest(),
                                                        os.stat(path).st_mtime_ns)
    return state


def every_file_text(folder: str) -> str:
    chunks = []
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                chunks.append(handle.read().decode("latin-1"))
    return "\n".join(chunks)


def test_publish_end_to_end(hub, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    out = make_output_dir(tmp_path / "run")
    expected = files_to_upload(out)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "llmkd_recipe.yaml", "llmkd_run.json", "results.json", "report.html", "log_history.json",
            "report/losses.png", "report/taid_t.png", "report/evaluation.png"} <= set(expected)
    assert "training_args.bin" not in expected and not any(p.startswith("checkpoint-") for p in expected)

    code = cli_main(["publish", out, "--repo-id", "org/tiny-taid", "--endpoint", hub.endpoint])
    assert code == 0
    assert hub.unexpected == []
    repo = hub.repos["org/tiny-taid"]
    assert repo.private is False and len(repo.commits) == 1
    create = next(r for r in hub.requests if r["path"] == "/api/repos/create")
    assert "visibility" not in json.loads(create["body"])  # without --private, the namespace's default
    arrived = repo.branches["main"]
    assert sorted(arrived) == sorted(expected + ["README.md"])
    for path in expected:  # byte-identical
        with open(os.path.join(out, path), "rb") as handle:
            assert arrived[path] == handle.read(), path
    # every request carried the token from the environment, as a header
    assert {r["authorization"] for r in hub.requests} == {f"Bearer {TOKEN}"}

    card = ModelCard(arrived["README.md"].decode())
    meta = card.data.to_dict()
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B"
    assert meta["datasets"] == ["trl-lib/Capybara"]  # Hub datasets; local files are listed under llmkd
    assert meta["llmkd"]["datasets"] == ["trl-lib/Capybara", "/data/local.jsonl"]
    assert meta["llmkd"]["method"] == "taid" and meta["llmkd"]["teacher"] == "Qwen/Qwen2.5-7B-Instruct"
    assert meta["llmkd"]["hyperparameters"] == {"t_start": 0.4, "alpha": 0.0005, "kd_ratio": 1.0,
                                                "learning_rate": 2e-5}
    assert meta["llmkd"]["retention"]["llmkd_addition_exact_match"]["exact_match"] == 0.5
    assert "taid" in meta["tags"] and "llmkd" in meta["tags"]
    index = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert index == {("llmkd_addition_exact_match", "exact_match"): 0.25,
                     ("llmkd_addition_perplexity", "byte_perplexity"): 3.5}
    assert meta["model-index"][0]["name"] == "tiny-taid"
    for plot in ("report/losses.png", "report/taid_t.png", "report/evaluation.png"):
        assert f"]({plot})" in card.text
    assert "| llmkd_addition_exact_match | exact_match ↑ | 0.2500 | 0.5000 | 0.5000 | 8 |" in card.text
    assert hub.validated_yaml and hub.validated_yaml[-1] == arrived["README.md"].decode()
    # the published card is kept locally after the upload succeeded
    assert open(os.path.join(out, "README.md"), "rb").read() == arrived["README.md"]

    # the token is nowhere: not in a file sent or kept, not in the card, not in logs or output
    printed = capsys.readouterr()
    assert "org/tiny-taid" in printed.out
    for text in [*(v.decode("latin-1") for v in arrived.values()), every_file_text(out), printed.out,
                 printed.err, caplog.text, *(r["body"].decode("latin-1") for r in hub.requests)]:
        assert TOKEN not in text
    assert "/preupload/main" in caplog.text  # requests were logged (DEBUG), with the token hidden


def test_publish_private_to_a_branch(hub, tmp_path):
    out = make_output_dir(tmp_path / "run")
    published = publish(out, "org/private-one", private=True, revision="v1", endpoint=hub.endpoint)
    repo = hub.repos["org/private-one"]
    assert repo.private is True
    assert set(repo.branches["v1"]) == set(published["files"]) and repo.branches["main"] == {}
    assert published["revision"] == "v1" and published["commit_url"].startswith(hub.endpoint)
    # publishing again to the same repository and branch works (repository and branch already exist)
    publish(out, "org/private-one", revision="v1", endpoint=hub.endpoint)
    assert len(repo.commits) == 2 and hub.unexpected == []


def test_failed_upload_reports_the_server_error_and_changes_nothing(hub, tmp_path, capsys):
    out = make_output_dir(tmp_path / "run")
    before = snapshot(out)
    hub.fail_commit = (403, "You don't have the rights to create a model under the namespace org")
    code = cli_main(["publish", out, "--repo-id", "org/refused", "--endpoint", hub.endpoint])
    assert code == 1
    error = capsys.readouterr().err
    assert "You don't have the rights to create a model under the namespace org" in error
    assert "HTTP 403" in error and "Nothing in" in error and TOKEN not in error
    assert snapshot(out) == before and not os.path.exists(os.path.join(out, "README.md"))
    assert hub.repos["org/refused"].branches["main"] == {}


def test_wrong_token_is_reported(hub, tmp_path, monkeypatch):
    out = make_output_dir(tmp_path / "run")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(PublishError, match="HTTP 401.*Invalid credentials"):
        publish(out, "org/x", endpoint=hub.endpoint)


def test_publish_refuses_what_cannot_be_published(tmp_path, monkeypatch):
    with pytest.raises(PublishError, match="is not a folder"):
        publish(str(tmp_path / "missing"), "org/x")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(PublishError, match=r"no safetensors weights.*pickle weights \(pytorch_model.bin\)"):
        publish(str(empty), "org/x")
    out = make_output_dir(tmp_path / "run")
    with pytest.raises(PublishError, match="not a repository id"):
        publish(out, "a/b/c")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE"):
        publish(out, "org/x")


def test_hub_token_is_refused_in_recipes_and_configs(tmp_path):
    with pytest.raises(RecipeError, match="HF_TOKEN"):
        load_config(os.path.join(ROOT, "recipes", "kd", "tiny.yaml"), ["--hub_token", TOKEN])
    with pytest.raises(ValueError, match="hub_token is not accepted"):
        DistillConfig(output_dir=str(tmp_path), hub_token=TOKEN)


TRAIN_ARGS = [
    "--model_name_or_path", os.path.join(ASSETS, "student"),
    "--teacher_model_name_or_path", os.path.join(ASSETS, "teacher"),
    "--dataset_name", os.path.join(ROOT, "recipes", "data", "addition_train.jsonl"),
    "--max_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "8", "--use_cpu", "True",
]


def test_push_to_hub_in_a_recipe_gives_the_same_card(hub, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    code = cli_main(["train", "--config", os.path.join(ROOT, "recipes", "kd", "tiny.yaml"), "--output_dir", str(out),
                     *TRAIN_ARGS, "--eval_tasks", "llmkd_addition_exact_match", "--eval_limit", "4",
                     "--push_to_hub", "True", "--hub_model_id", "org/pushed", "--hub_private_repo", "True",
                     "--hub_endpoint", hub.endpoint])
    assert code == 0
    assert hub.unexpected == []
    repo = hub.repos["org/pushed"]
    assert repo.private is True and len(repo.commits) == 1  # one upload, at the end
    arrived = repo.branches["main"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "llmkd_recipe.yaml", "results.json",
            "report.html", "report/losses.png", "README.md"} <= set(arrived)
    assert "training_args.bin" not in arrived
    # the card equals what `llmkd publish` builds from the same folder
    assert arrived["README.md"].decode() == str(build_model_card(str(out), "org/pushed"))
    meta = ModelCard(arrived["README.md"].decode()).data.to_dict()
    assert meta["llmkd"]["method"] == "kd" and meta["llmkd"]["teacher"] == os.path.join(ASSETS, "teacher")
    assert meta["llmkd"]["hyperparameters"]["divergence"] == "fkl"
    assert meta["model-index"][0]["results"][0]["dataset"]["name"] == "llmkd_addition_exact_match"
    for text in [every_file_text(str(out)), caplog.text, *(v.decode("latin-1") for v in arrived.values())]:
        assert TOKEN not in text


def test_trainer_push_to_hub_writes_llmkd_card(tmp_path):
    """Python API: DistillTrainer.create_model_card (what Trainer.push_to_hub calls) writes llmkd's card."""
    tokenizer = make_tokenizer()
    from utils import prompt_completion_rows
    from datasets import Dataset

    args = DistillConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4,
                         report_to="none", save_strategy="no", use_cpu=True, kd_ratio=0.5, divergence="rkl",
                         hub_model_id="org/api", model_name_or_path="org/student-base")
    trainer = DistillTrainer(model=tiny_llama(len(tokenizer), seed=1), teacher_model=tiny_llama(len(tokenizer),
                             hidden=48, seed=2), args=args, train_dataset=Dataset.from_list(prompt_completion_rows(8)),
                             processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card(model_name="ignored", tags=["ignored"])
    card = (tmp_path / "run" / "README.md").read_text()
    assert card == str(build_model_card(str(tmp_path / "run"), "org/api"))
    meta = ModelCard(card).data.to_dict()
    assert meta["llmkd"]["method"] == "kd" and meta["llmkd"]["hyperparameters"]["divergence"] == "rkl"
    assert meta["base_model"] == "org/student-base"
