"""Several teachers (llmkd.teacher_signals.multi, llmkd.losses.groups): a routed batch's loss and gradient equal
the sum of single-teacher runs on the rows of each teacher, a mixed batch's the weighted sum of single-teacher runs
on all rows; training end to end with a local and a cached teacher; the refusals of bad settings.

Tolerance: the two sides add the same float32 terms in another order (per group vs in one pass), so they differ
by a few float32 roundings of sums of N * V terms of size <= |loss| + 1: bound(terms) = terms * 2^-24 * scale.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

from utils import make_tokenizer, prompt_completion_rows, tiny_llama
from llmkd import DistillConfig, DistillTrainer
from llmkd.cache import write_teacher_cache
from llmkd.data import prepare_dataset
from llmkd.teacher_signals import MultiTeacher

EPS32 = 2.0 ** -24


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tokenizer()
    rows = prompt_completion_rows(12)
    for i, row in enumerate(rows):
        row["domain"] = "math" if i % 3 else "words"
    return {"tokenizer": tokenizer, "rows": rows, "student": tiny_llama(len(tokenizer), hidden=32, seed=7),
            "math": tiny_llama(len(tokenizer), hidden=48, seed=8), "words": tiny_llama(len(tokenizer), hidden=48,
                                                                                   seed=9)}


def config(tmp_path, **fields):
    return DistillConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_length=64,
                         per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True, kd_ratio=0.6,
                         verify_logit_head=False, **fields)


def batch_gradient(trainer, rows, normalizer):
    """The loss of ``rows`` as one micro-batch divided by ``normalizer``, and its gradient."""
    model = trainer.model
    model.zero_grad()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(normalizer))
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def valid_count(trainer, rows):
    return sum(int((torch.tensor(trainer.train_dataset[i]["labels"][1:]) != -100).sum()) for i in rows)


def single(setup, tmp_path, name, rows):
    data = Dataset.from_list([setup["rows"][i] for i in rows]).remove_columns("domain")
    return DistillTrainer(model=copy.deepcopy(setup["student"]), teacher_model=setup[name], args=config(tmp_path),
                          train_dataset=data, processing_class=setup["tokenizer"])


def assert_close(a, b, terms, scale):
    torch.testing.assert_close(a, b, rtol=0, atol=terms * EPS32 * scale)


@pytest.mark.parametrize("chunked", [True, False])
def test_routed_batch_equals_single_teacher_runs_on_the_split(setup, tmp_path, chunked):
    teachers = [{"name": "math"}, {"name": "words", "weight": 2.0}]
    trainer = DistillTrainer(model=copy.deepcopy(setup["student"]),
                             teacher_model={"math": setup["math"], "words": setup["words"]},
                             args=config(tmp_path, teachers=teachers, teacher_routing_column="domain",
                                         use_chunked_loss=chunked),
                             train_dataset=Dataset.from_list(setup["rows"]), processing_class=setup["tokenizer"])
    assert isinstance(trainer.teacher_signal, MultiTeacher)
    rows = [0, 1, 2, 3, 4, 5]  # rows 0 and 3 are "words", the others "math"
    n = valid_count(trainer, rows)
    loss, grads = batch_gradient(trainer, rows, n)
    math_rows, word_rows = [1, 2, 4, 5], [0, 3]
    loss_math, grads_math = batch_gradient(single(setup, tmp_path, "math", math_rows), [0, 1, 2, 3], n)
    words = single(setup, tmp_path, "words", word_rows)
    words.args.kd_ratio = 0.6
    # the words teacher's weight 2 doubles its token loss: (2 * 0.6 KD + 0.4 CE) = single run with kd 1.2, ce 0.4
    words.loss_weights = lambda: (1.2, 0.4)
    loss_words, grads_words = batch_gradient(words, [0, 1], n)
    terms = n * len(setup["tokenizer"])
    assert_close(loss, loss_math + loss_words, terms, float(loss) + 1)
    for g, a, b in zip(grads, grads_math, grads_words):
        assert_close(g, a + b, terms, 10.0)
    # the logs name each teacher with its own tokens
    metrics = trainer._reduced_metrics(True)
    assert metrics["tokens/math"] + metrics["tokens/words"] == n
    assert metrics["tokens/words"] == valid_count(trainer, word_rows)
    assert metrics["kd_loss/math"] > 0 and metrics["kd_loss/words"] > 0


def test_mixed_batch_is_the_weighted_sum_of_single_teacher_runs(setup, tmp_path):
    teachers = [{"name": "math", "weight": 3.0}, {"name": "words", "weight": 1.0}]
    trainer = DistillTrainer(model=copy.deepcopy(setup["student"]),
                             teacher_model={"math": setup["math"], "words": setup["words"]},
                             args=config(tmp_path, teachers=teachers),
                             train_dataset=Dataset.from_list(setup["rows"]), processing_class=setup["tokenizer"])
    rows = [0, 1, 2, 3]
    n = valid_count(trainer, rows)
    loss, grads = batch_gradient(trainer, rows, n)
    loss_math, grads_math = batch_gradient(single(setup, tmp_path, "math", rows), rows, n)
    loss_words, grads_words = batch_gradient(single(setup, tmp_path, "words", rows), rows, n)
    terms = 2 * n * len(setup["tokenizer"])
    assert_close(loss, 0.75 * loss_math + 0.25 * loss_words, terms, float(loss) + 1)
    for g, a, b in zip(grads, grads_math, grads_words):
        assert_close(g, 0.75 * a + 0.25 * b, terms, 10.0)
    metrics = trainer._reduced_metrics(True)
    assert metrics["tokens/math"] == metrics["tokens/words"] == n


def test_training_with_a_local_and_a_cached_teacher(setup, tmp_path):
    tokenizer = setup["tokenizer"]
    data = Dataset.from_list(setup["rows"])
    prepared = prepare_dataset(data.remove_columns("domain"), tokenizer, max_length=64, completion_only_loss=True)
    write_teacher_cache(setup["words"], prepared, tokenizer, tmp_path / "cache", top_k=16, temperature=1.0,
                        shard_rows=6, batch_size=4, progress=False)
    student = copy.deepcopy(setup["student"])
    initial = [p.detach().clone() for p in student.parameters()]
    teachers = [{"name": "math"}, {"name": "words", "teacher_cache": str(tmp_path / "cache")}]
    args = config(tmp_path, teachers=teachers, teacher_routing_column="domain", max_steps=6, learning_rate=1e-2,
                  logging_steps=2)
    trainer = DistillTrainer(model=student, teacher_model={"math": setup["math"]}, args=args, train_dataset=data,
                             processing_class=tokenizer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert all(key in logs[0] for key in ("kd_loss/math", "kd_loss/words", "tokens/math", "tokens/words"))
    assert max((a - b).abs().max() for a, b in zip(student.parameters(), initial)) > 1e-3
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = type(student).from_pretrained(str(tmp_path / "saved"))
    for a, b in zip(student.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)


def test_bad_settings_are_refused(setup, tmp_path):
    tokenizer, data = setup["tokenizer"], Dataset.from_list(setup["rows"])

    def make(teachers, models=None, **fields):
        return DistillTrainer(model=copy.deepcopy(setup["student"]), teacher_model=models,
                              args=config(tmp_path, teachers=teachers, **fields), train_dataset=data,
                              processing_class=tokenizer)

    models = {"math": setup["math"], "words": setup["words"]}
    with pytest.raises(ValueError, match=r"Rows name teachers \['poetry'\].*\['math', 'words'\]"):
        DistillTrainer(model=copy.deepcopy(setup["student"]), teacher_model=models,
                       args=config(tmp_path, teachers=[{"name": "math"}, {"name": "words"}],
                                   teacher_routing_column="domain"),
                       train_dataset=Dataset.from_list(setup["rows"] + [{**setup["rows"][0], "domain": "poetry"}]),
                       processing_class=tokenizer)
    with pytest.raises(ValueError, match="'topic' is not a column"):
        make([{"name": "math"}, {"name": "words"}], models, teacher_routing_column="topic")
    with pytest.raises(ValueError, match="has no source"):
        make([{"name": "math"}, {"name": "words"}], {"math": setup["math"]})
    with pytest.raises(ValueError, match="names must be unique"):
        make([{"name": "math"}, {"name": "math"}], {"math": setup["math"]})
    with pytest.raises(ValueError, match="does not list"):
        make([{"name": "math"}, {"name": "words"}], {**models, "poetry": setup["math"]})
    with pytest.raises(ValueError, match="seq_kd"):
        make([{"name": "math"}, {"name": "words"}], models, seq_kd=True)
    with pytest.raises(ValueError, match="vocabularies differ"):  # heads padded past the tokenizer differently
        DistillTrainer(model=tiny_llama(len(tokenizer) + 2), args=config(tmp_path, teachers=[{"name": "math"},
                                                                                             {"name": "words"}]),
                       teacher_model={"math": tiny_llama(len(tokenizer) + 2), "words": setup["words"]},
                       train_dataset=data, processing_class=tokenizer)
    with pytest.raises(ValueError, match="do not hold"):
        make([{"name": "math"}, {"name": "words", "teacher_cache": "cache"}], {"math": setup["math"]}, lmbda=0.5)
    with pytest.raises(ValueError, match="move that teacher into teachers"):
        DistillConfig(output_dir="o", report_to=[], teachers=[{"name": "a"}], teacher_model_name_or_path="x")
    with pytest.raises(ValueError, match="unknown keys"):
        DistillConfig(output_dir="o", report_to=[], teachers=[{"name": "a", "path": "x"}])
    with pytest.raises(ValueError, match="set teachers too"):
        DistillConfig(output_dir="o", report_to=[], teacher_routing_column="domain")
    with pytest.raises(ValueError, match="list of teachers"):
        DistillConfig(output_dir="o", report_to=[], teachers="[{name: a}]")


def test_taid_with_routed_teachers(setup, tmp_path):
    """TAIDTrainer's interpolated KL on each teacher's rows; its schedule sees the combined loss."""
    from llmkd import TAIDConfig, TAIDTrainer

    args = TAIDConfig(output_dir=str(tmp_path / "taid"), report_to=[], use_cpu=True, max_steps=3,
                      per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True, logging_steps=1,
                      max_length=64, teachers=[{"name": "math"}, {"name": "words"}], teacher_routing_column="domain")
    student = copy.deepcopy(setup["student"])
    initial = [p.detach().clone() for p in student.parameters()]
    trainer = TAIDTrainer(model=student, teacher_model={"math": setup["math"], "words": setup["words"]}, args=args,
                          train_dataset=Dataset.from_list(setup["rows"]), processing_class=setup["tokenizer"])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all("taid_t" in entry and entry["tokens/math"] > 0 for entry in logs)
    assert max((a - b).abs().max() for a, b in zip(student.parameters(), initial)) > 0
