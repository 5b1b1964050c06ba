"""The offline teacher cache for a teacher with another tokenizer: the teacher's top-k in its own vocabulary over
its tokens of trained spans, fingerprinted by both tokenizers and the aligned rows. At k = V_t (lossless) training
from it equals training with the live teacher; a cache of another tokenizer pair stops the run."""

from __future__ import annotations

import copy

import pytest
from datasets import Dataset
from test_cache_training import EQUIVALENCE, GRADIENT_RTOL, UPDATE_RTOL, max_update_error
from test_cross_tokenizer import metaspace_tokenizer
from test_cross_tokenizer_trainer import ALPHABET
from utils import prompt_completion_rows, tiny_llama

from llmkd import DistillConfig, DistillTrainer, TAIDConfig, TAIDTrainer
from llmkd.cache import CacheMismatchError, TeacherCache, write_teacher_cache
from llmkd.cross_tokenizer import RowAligner
from llmkd.cross_tokenizer.dataset import TEACHER_SPANS, align_dataset
from llmkd.data import prepare_dataset

MAX_LENGTH = 48


@pytest.fixture(scope="module")
def teacher_tokenizer():
    return metaspace_tokenizer(120, alphabet_from=ALPHABET)


@pytest.fixture(scope="module")
def rows():
    return Dataset.from_list(prompt_completion_rows(24, seed=5))


@pytest.fixture(scope="module")
def models(tokenizer, teacher_tokenizer):
    return tiny_llama(len(tokenizer), hidden=32, seed=1), tiny_llama(len(teacher_tokenizer), hidden=48, seed=2)


def aligned_rows(rows, tokenizer, teacher_tokenizer):
    prepared = prepare_dataset(rows, tokenizer, max_length=MAX_LENGTH, completion_only_loss=True)
    return align_dataset(prepared, RowAligner(tokenizer, teacher_tokenizer), "train")[0]


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, models, rows, tokenizer, teacher_tokenizer):
    path = tmp_path_factory.mktemp("cross_cache") / "full"
    write_teacher_cache(copy.deepcopy(models[1]).eval(), aligned_rows(rows, tokenizer, teacher_tokenizer), tokenizer,
                        str(path), top_k=len(teacher_tokenizer), temperature=1.0, shard_rows=8, batch_size=4,
                        logprob_bits=32, progress=False, teacher_tokenizer=teacher_tokenizer)
    return str(path)


def test_the_cache_holds_the_teachers_tokens_of_trained_spans(full_cache, rows, tokenizer, teacher_tokenizer):
    cache = TeacherCache(full_cache)
    aligned = aligned_rows(rows, tokenizer, teacher_tokenizer)
    assert cache.vocab_size == len(teacher_tokenizer) and cache.num_rows == len(rows)
    expected = [sum(1 for s in spans if s >= 0) for spans in aligned[TEACHER_SPANS]]
    assert cache.row_token_counts(range(len(rows))).tolist() == expected
    cache.check_compatible(tokenizer, aligned, teacher_tokenizer=teacher_tokenizer)
    with pytest.raises(CacheMismatchError, match="tokenizers"):
        cache.check_compatible(tokenizer, aligned, teacher_tokenizer=metaspace_tokenizer(40, alphabet_from=ALPHABET))


@pytest.mark.parametrize("trainer_class,config_class,loss", [(DistillTrainer, DistillConfig, "hybrid"),
                                                             (DistillTrainer, DistillConfig, "span"),
                                                             (TAIDTrainer, TAIDConfig, "hybrid")])
def test_training_from_a_full_cache_equals_online_training(tmp_path, models, rows, tokenizer, teacher_tokenizer,
                                                           full_cache, trainer_class, config_class, loss):
    """Tolerances as tests/test_cache_training.py's (the same float32 bound: the cache's log-probabilities against
    the teacher projected online)."""
    init = {k: v.detach().clone() for k, v in models[0].state_dict().items()}
    runs = {}
    for source in ("online", "cache"):
        student = copy.deepcopy(models[0])
        extra = {"teacher_model": copy.deepcopy(models[1])} if source == "online" else {}
        overrides = {"teacher_cache": full_cache} if source == "cache" else {}
        args = config_class(output_dir=str(tmp_path / source), per_device_train_batch_size=4, max_steps=5,
                            logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
                            max_length=MAX_LENGTH, loss_chunk_size=16, cross_tokenizer_loss=loss, **EQUIVALENCE,
                            **overrides)
        trainer = trainer_class(model=student, args=args, train_dataset=rows, processing_class=tokenizer,
                                teacher_processing_class=teacher_tokenizer, **extra)
        if source == "cache":
            assert trainer.teacher is None
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "kd_loss" in e]
        runs[source] = losses, {k: v.detach().clone() for k, v in student.state_dict().items()}
    assert len(runs["online"][0]) == 5
    assert runs["cache"][0] == pytest.approx(runs["online"][0], rel=5 * GRADIENT_RTOL)
    moved = max((runs["online"][1][k] - v).abs().max().item() for k, v in init.items())
    assert moved > 1e-3, f"5 SGD steps barely moved the student ({moved:.1e})"
    error, name = max_update_error(init, runs["online"][1], runs["cache"][1])
    assert error < UPDATE_RTOL, f"the cache run's update of {name} differs by {error:.2e} (relative)"


def test_misused_cross_tokenizer_caches_are_refused(tmp_path, models, rows, tokenizer, teacher_tokenizer,
                                                    full_cache):
    aligned = aligned_rows(rows, tokenizer, teacher_tokenizer)
    prepared = prepare_dataset(rows, tokenizer, max_length=MAX_LENGTH, completion_only_loss=True)
    for data, teacher_tok in ((aligned, None), (prepared, teacher_tokenizer)):
        with pytest.raises(ValueError, match="aligned rows"):
            write_teacher_cache(models[1], data, tokenizer, str(tmp_path / "bad"), top_k=8, temperature=1.0,
                                shard_rows=8, batch_size=4, progress=False, teacher_tokenizer=teacher_tok)
    # a cross-tokenizer cache in a same-tokenizer run: its ids are the teacher's, not the student's
    args = DistillConfig(output_dir=str(tmp_path / "same"), report_to="none", teacher_cache=full_cache,
                         max_length=MAX_LENGTH)
    with pytest.raises((CacheMismatchError, ValueError)):
        DistillTrainer(model=copy.deepcopy(models[0]), args=args, train_dataset=rows, processing_class=tokenizer)
    # without the teacher's tokenizer the run cannot align its rows
    args = DistillConfig(output_dir=str(tmp_path / "none"), report_to="none", teacher_cache=full_cache,
                         max_length=MAX_LENGTH, cross_tokenizer_loss="uld")
    with pytest.raises(ValueError, match="teacher's tokenizer"):
        DistillTrainer(model=copy.deepcopy(models[0]), args=args, train_dataset=rows, processing_class=tokenizer)


def test_the_command_line_caches_and_trains_the_shipped_recipe(tmp_path):
    """recipes/cross_tokenizer/tiny.yaml: ``llmkd cache-teacher`` writes the aligned rows' cache (the teacher's
    vocabulary, both tokenizers in the fingerprint), and ``llmkd train`` trains from it without loading the teacher."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    recipe = "recipes/cross_tokenizer/tiny.yaml"
    written = subprocess.run([sys.executable, "-m", "llmkd", "cache-teacher", "--config", recipe, "--output_dir",
                              str(tmp_path / "cache")], capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert written.returncode == 0, written.stderr[-3000:]
    cache = TeacherCache(tmp_path / "cache")
    assert cache.vocab_size == 115 and cache.num_rows == 1000
    trained = subprocess.run([sys.executable, "-m", "llmkd", "train", "--config", recipe, "--teacher_cache",
                              str(tmp_path / "cache"), "--max_steps", "3", "--logging_steps", "1", "--output_dir",
                              str(tmp_path / "out"), "--eval_strategy", "no"], capture_output=True, text=True,
                             env=env, timeout=300, cwd=root)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert trained.stdout.count("'kd_loss'") + trained.stderr.count("'kd_loss'") == 3
