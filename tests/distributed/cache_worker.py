"""Per-process script of tests/test_cache.py: write a teacher cache of a tiny teacher, optionally killing itself
with SIGKILL at a chosen moment.

Run plainly (one process, ``python cache_worker.py --out DIR``) or by :func:`distributed.launcher.launch` (each
torchrun rank writes its round-robin share of the shards). Every run caches the same 20 rows (5 shards of 4 rows,
2 teacher forwards per shard) from the same seeded teacher, so every run's cache must be byte-identical.

``--kill-at`` (the process SIGKILLs itself; nothing is cleaned up):
    ``forward:N``   at the start of this run's N-th teacher forward (in the middle of a shard);
    ``commit:N``    when the N-th shard file of this run is complete under its temporary name, before the rename;
    ``record:N``    after the N-th shard of this run is renamed into place, before its record is written;
    ``metadata``    when metadata.json is complete under its temporary name, before the rename.

Writes ``report-rank<r>.json`` under ``$LLMKD_TEST_OUT`` (when set): the shards this run computed and the number of
teacher forwards it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (utils.py)
from utils import make_tokenizer, prompt_completion_rows, tiny_llama  # noqa: E402

import llmkd.cache.files as cache_files  # noqa: E402
import llmkd.cache.writer as cache_writer  # noqa: E402
from llmkd.cache import write_teacher_cache  # noqa: E402
from llmkd.data import prepare_dataset  # noqa: E402

ROWS, SHARD_ROWS, BATCH_SIZE, TOP_K, TEMPERATURE = 20, 4, 2, 8, 1.5


def teacher_and_data():
    """The tiny teacher (a head 7 rows wider than the tokenizer, logits scaled up so the distributions are peaked),
    its tokenizer, and the prepared rows (completions of different lengths)."""
    tokenizer = make_tokenizer()
    teacher = tiny_llama(len(tokenizer) + 7, hidden=48, seed=2)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(60.0)
    rows = prompt_completion_rows(ROWS, seed=5)
    for i, row in enumerate(rows):
        row["completion"] += " one two three" * (i % 3)
    prepared = prepare_dataset(Dataset.from_list(rows), tokenizer, max_length=64, completion_only_loss=True)
    return teacher.eval(), tokenizer, prepared


def kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(kill_at: str, teacher) -> None:
    what, _, count = kill_at.partition(":")
    target = int(count) if count else 1
    seen = {"forward": 0, "commit": 0, "record": 0}
    if what == "forward":
        def pre_hook(module, args, kwargs):
            seen["forward"] += 1
            if seen["forward"] == target:
                kill_self()
        teacher.register_forward_pre_hook(pre_hook, with_kwargs=True)
        return
    original = cache_files.commit

    def commit(temporary, path):
        name = Path(path).name
        if what == "metadata" and name == cache_files.METADATA_FILE:
            kill_self()
        if what == "commit" and name.endswith(".arrow"):
            seen["commit"] += 1
            if seen["commit"] == target:
                kill_self()
        original(temporary, path)
        if what == "record" and name.endswith(".arrow"):
            seen["record"] += 1
            if seen["record"] == target:
                kill_self()

    cache_files.commit = commit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill-at", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher, tokenizer, prepared = teacher_and_data()

    accelerator = None
    if "LOCAL_RANK" in os.environ:
        from accelerate import PartialState

        accelerator = PartialState()
    forwards = {"count": 0}
    teacher.register_forward_pre_hook(lambda module, inputs: forwards.__setitem__("count", forwards["count"] + 1))
    computed = []
    original_write_shard = cache_writer._write_shard

    def write_shard(output_dir, index, *rest, **kwargs):
        computed.append(index)
        return original_write_shard(output_dir, index, *rest, **kwargs)

    cache_writer._write_shard = write_shard
    if args.kill_at:
        install_kill(args.kill_at, teacher)

    cache = write_teacher_cache(teacher, prepared, tokenizer, args.out, top_k=TOP_K, temperature=TEMPERATURE,
                                shard_rows=SHARD_ROWS, batch_size=BATCH_SIZE, accelerator=accelerator,
                                teacher_name="tiny-teacher", progress=False)
    rank = accelerator.process_index if accelerator is not None else 0
    report = {"rank": rank, "computed": computed, "forwards": forwards["count"], "num_tokens": cache.num_tokens}
    if os.environ.get("LLMKD_TEST_OUT"):
        (Path(os.environ["LLMKD_TEST_OUT"]) / f"report-rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
