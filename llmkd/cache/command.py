"""``llmkd cache-teacher``: write a teacher cache as a recipe says, or ``--verify`` one.

    llmkd cache-teacher --config RECIPE.yaml [--output_dir PATH] [--batch_size N] [--logprob_bits B]
                        [--split train|eval] [--field value ...]
    accelerate launch [--config_file recipes/accelerate/zero3.yaml] -m llmkd cache-teacher --config RECIPE.yaml
    llmkd cache-teacher --config RECIPE.yaml --teacher_server http://127.0.0.1:8000   # a served teacher
    llmkd cache-teacher --verify PATH

The recipe is read like ``llmkd train``'s (any config field can be overridden, e.g. ``--cache_top_k 32``); the
teacher is loaded from ``teacher_model_name_or_path`` with ``teacher_dtype`` and the 4/8-bit fields, the dataset is
prepared with the tokenizer the trainer uses (the student's when the recipe names one) and the recipe's
``max_length`` / ``completion_only_loss``, and k, temperature and shard size come from ``cache_top_k``,
``cache_temperature`` and ``cache_shard_rows``. The cache goes to ``--output_dir`` (default: the recipe's
``teacher_cache``).

With ``teacher_server`` (a recipe field or ``--teacher_server URL``) the teacher is a vLLM or SGLang
server (docs/SERVED_TEACHERS.md): no teacher is loaded here, its tokenizer is checked against the run's, and the same
cache is written from its top-k log-probabilities (temperature 1), ``--batch_size`` rows of requests at a time
(default ``4 * teacher_server_concurrency``). A rerun after a failure resumes from the shards written.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..data import IMAGE_FIELDS

logger = logging.getLogger("llmkd")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmkd cache-teacher",
        description="Run a recipe's teacher once over its training data and cache its top-k log-probabilities, or "
        "re-check a cache (--verify). Config fields can be overridden: --cache_top_k 32 --max_length 2048.",
    )
    parser.add_argument("--config", help="The recipe YAML (teacher, data, cache_* fields).")
    parser.add_argument("--verify", metavar="PATH", help="Re-check the cache at PATH and print a summary.")
    parser.add_argument("--output_dir", help="Where to write the cache (default: the recipe's teacher_cache).")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="Rows per teacher forward (default: per_device_eval_batch_size).")
    parser.add_argument("--logprob_bits", type=int, default=8,
                        help="Bits per cached log-probability: 8 (default, companded code), 2-16, or 32 (lossless).")
    parser.add_argument("--split", choices=("train", "eval"), default="train", help="Which split to cache.")
    return parser


def main(argv: list[str]) -> int:
    parser = _parser()
    known, overrides = parser.parse_known_args(argv)
    if known.verify:
        if known.config or overrides:
            parser.error("--verify PATH takes no other argument.")
        return verify(known.verify)
    if not known.config:
        parser.error("give --config RECIPE.yaml to write a cache, or --verify PATH to check one.")
    return write(known, overrides)


def verify(path: str) -> int:
    from .errors import CacheError
    from .reader import TeacherCache

    try:
        summary = TeacherCache(path).verify()
    except (CacheError, FileNotFoundError) as error:
        print(f"llmkd cache-teacher --verify: FAILED\n{error}", file=sys.stderr)
        return 1
    print(f"Teacher cache {summary['path']}: OK")
    for key in ("teacher", "rows", "tokens", "shards", "k", "temperature", "vocab_size", "logprob_bits", "bytes",
                "bytes_per_token"):
        print(f"  {key}: {summary[key]}")
    return 0


def write(known, overrides: list[str]) -> int:
    import time

    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from ..data import prepare_dataset
    from ..data.sources import load_dataset_splits
    from ..loading import tokenizer_of
    from ..recipes import load_config
    from ..teacher import check_same_tokenizer, prepare_teacher
    from .writer import write_teacher_cache

    _, config = load_config(known.config, overrides, output_fields=("teacher_cache",))  # the cache is written here
    output_dir = known.output_dir or config.teacher_cache
    if not output_dir:
        raise SystemExit("llmkd cache-teacher: no output folder: pass --output_dir PATH or set teacher_cache in the "
                         "recipe.")
    served = bool(config.teacher_server)
    if not config.teacher_model_name_or_path and not served:
        raise SystemExit("llmkd cache-teacher: the recipe names no teacher (teacher_model_name_or_path, or "
                         "teacher_server for a served one).")
    # a served teacher: waves of requests, several per request slot in flight
    batch_size = known.batch_size or (4 * config.teacher_server_concurrency if served
                                      else config.per_device_eval_batch_size)
    accelerator = Accelerator(deepspeed_plugin=getattr(config, "deepspeed_plugin", None))
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if is_deepspeed:
        _fill_deepspeed_batch_sizes(accelerator, batch_size)

    tokenizer, teacher_tokenizer = _tokenizers(config)
    cross = config.cross_tokenizer_loss is not None and teacher_tokenizer is not None
    if not cross:
        check_same_tokenizer(tokenizer, teacher_tokenizer)
    if served:  # its tokenizer is checked against the run's by write_teacher_cache, before any scoring request
        from ..teacher_server import TeacherServer

        teacher = TeacherServer.from_config(config)
    else:
        teacher = _load_teacher(config, teacher_tokenizer or tokenizer)  # the tokenizer is not loaded twice
        teacher = prepare_teacher(teacher, accelerator, is_deepspeed=is_deepspeed,
                                  is_fsdp=accelerator.distributed_type == DistributedType.FSDP)

    train, evaluation = load_dataset_splits(config)
    dataset = train if known.split == "train" else evaluation
    if dataset is None:
        raise SystemExit(f"llmkd cache-teacher: the recipe has no {known.split} split (dataset_name / "
                         "dataset_eval_split).")
    columns = dataset.column_names
    with accelerator.main_process_first():
        prepared = prepare_dataset(
            dataset, tokenizer, max_length=config.max_length, completion_only_loss=config.completion_only_loss,
            num_proc=config.dataset_num_proc, extra_columns=tuple(c for c in IMAGE_FIELDS if c in columns),
        )
    if cross:  # the teacher's tokens of each row and the spans, as the trainer aligns them (docs/CROSS_TOKENIZER.md)
        from ..cross_tokenizer import RowAligner
        from ..cross_tokenizer.dataset import align_dataset

        with accelerator.main_process_first():
            prepared, _ = align_dataset(prepared, RowAligner(tokenizer_of(tokenizer), teacher_tokenizer), known.split,
                                        config.dataset_num_proc)
    source = {"dataset_name": config.dataset_name, "dataset_config": config.dataset_config, "split": known.split,
              "max_length": config.max_length, "completion_only_loss": config.completion_only_loss,
              "teacher_dtype": config.teacher_dtype, "teacher_load_in_4bit": config.teacher_load_in_4bit,
              "teacher_load_in_8bit": config.teacher_load_in_8bit}
    top_k = config.cache_top_k
    vocab_size = len(teacher_tokenizer) if cross else len(tokenizer_of(tokenizer))
    if top_k > vocab_size:
        logger.warning("cache_top_k=%d exceeds the %d-token vocabulary: caching the whole distribution (k = %d).",
                       top_k, vocab_size, vocab_size)
        top_k = vocab_size
    started = time.monotonic()
    cache = write_teacher_cache(
        teacher, prepared, tokenizer, output_dir, top_k=top_k, temperature=config.cache_temperature,
        shard_rows=config.cache_shard_rows, batch_size=batch_size,
        teacher_name=teacher.model_root if served else config.teacher_model_name_or_path,
        teacher_revision=config.teacher_revision, accelerator=accelerator, logprob_bits=known.logprob_bits,
        source=source, progress=not config.disable_tqdm, teacher_tokenizer=teacher_tokenizer if cross else None,
    )
    if accelerator.is_main_process:
        seconds = time.monotonic() - started
        print(f"Teacher cache {cache.path}: {cache.num_rows} rows, {cache.num_tokens} tokens, k={cache.k}, "
              f"{cache.metadata['bytes_per_token']} bytes/token on disk; {seconds:.1f} s this run.")
    return 0


def _tokenizers(config):
    """(the tokenizer the trainer prepares data with, the teacher's tokenizer): the student's and the teacher's, or
    the teacher's alone when the recipe names no student."""
    from ..loading import student_processing_class, teacher_processing_class, tokenizer_of

    if not config.model_name_or_path:
        return teacher_processing_class(config), None
    if not config.teacher_model_name_or_path:  # a served teacher with the student's tokenizer
        return student_processing_class(config), None
    return student_processing_class(config), tokenizer_of(teacher_processing_class(config))


def _load_teacher(config, teacher_tokenizer=None):
    """The teacher as the trainer loads it (:func:`llmkd.loading.load_teacher`: dtype, 4/8-bit quantization,
    revision)."""
    from ..loading import detect_task, load_teacher

    task = detect_task(config.teacher_model_name_or_path, revision=config.teacher_revision,
                       trust_remote_code=config.trust_remote_code)
    if task != "causal_lm":
        raise SystemExit("llmkd cache-teacher caches causal-LM teachers (token distributions); this teacher is a "
                         "sequence classifier, whose forward is cheap enough to run online.")
    teacher, _ = load_teacher(None, config, teacher_tokenizer, task)
    return teacher


def _fill_deepspeed_batch_sizes(accelerator, batch_size: int) -> None:
    """DeepSpeed refuses "auto" batch sizes outside the Trainer; an inference engine needs any consistent ones."""
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds_config["train_micro_batch_size_per_gpu"] = batch_size
    if ds_config.get("gradient_accumulation_steps", "auto") == "auto":
        ds_config["gradient_accumulation_steps"] = 1
    if ds_config.get("train_batch_size", "auto") == "auto":
        ds_config["train_batch_size"] = (ds_config["train_micro_batch_size_per_gpu"]
                                         * ds_config["gradient_accumulation_steps"] * accelerator.num_processes)
    if ds_config.get("gradient_clipping") == "auto":
        ds_config["gradient_clipping"] = 1.0
