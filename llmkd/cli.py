"""The ``llmkd`` command line: ``llmkd train --config RECIPE.yaml [--field value ...]`` and ``llmkd quickstart``."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

logger = logging.getLogger("llmkd")


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llmkd train", description="Distil a student from a teacher as a recipe says. Any config field can "
        "be overridden: --learning_rate 1e-4 --max_steps 10.",
    )
    parser.add_argument("--config", required=True, help="The recipe YAML (method, models, data, config fields).")
    parser.add_argument("--resume_from_checkpoint", default=None,
                        help="A checkpoint folder, or 'latest' for the newest one in output_dir.")
    known, overrides = parser.parse_known_args(argv)

    from .methods import method_entry
    from .recipes import load_config

    method, config = load_config(known.config, overrides)
    trainer_class = method_entry(method).trainer_class
    # push_to_hub: llmkd publishes once, after the evaluation and report, with its own card (llmkd.hub.publish),
    # instead of the Trainer creating the repository at start-up and uploading at every save.
    push = bool(getattr(config, "push_to_hub", False))
    config.push_to_hub = False
    if getattr(config, "eval_tasks", None):  # an unknown task fails now, not after training
        from .evaluation import validate_tasks

        validate_tasks(config.eval_tasks)
    trainer = trainer_class(args=config)
    resume = known.resume_from_checkpoint
    if resume == "latest":
        from .trainers.guards import last_complete_checkpoint

        resume = last_complete_checkpoint(config.output_dir)  # skips a checkpoint whose write did not finish
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    if trainer.accelerator.is_main_process:
        shutil.copyfile(known.config, os.path.join(config.output_dir, "llmkd_recipe.yaml"))
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(config.output_dir)
        from .report import finish_run

        finish_run(trainer, method, push=push)  # llmkd_run.json, eval_tasks, report.html, README.md, push_to_hub
    # Every rank waits for the main process's finishing work, then the process group is torn down: a rank that
    # exited with its communication threads alive was seen to abort ("terminate called without an active
    # exception") under a 2-process ZeRO-3 launch.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    return 0


def _eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llmkd eval", description="Score a student (and its teacher: retention ratio per task) with lm-eval on "
        "llmkd's offline tasks (eval/tasks) or any lm-eval task; classifiers with evaluate's accuracy and F1. "
        "Writes results.json and results.md.",
    )
    parser.add_argument("--model", required=True, help="The student: a folder saved by llmkd train, or a Hub name.")
    parser.add_argument("--teacher", default=None, help="The teacher (folder or Hub name), for the retention ratio.")
    parser.add_argument("--tasks", required=True, help="Comma-separated: llmkd_addition_exact_match,"
                        "llmkd_addition_choice,llmkd_addition_perplexity, any lm-eval task, llmkd_sentiment "
                        "(classifiers) or a jsonl of GLUE-style rows.")
    parser.add_argument("--limit", type=int, default=None, help="Examples per task (default: all).")
    parser.add_argument("--output_dir", default=None, help="Where results.json/results.md go (default: --model).")
    parser.add_argument("--batch_size", type=int, default=16, help="Batch size of the model calls.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available).")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto.")
    parser.add_argument("--include_path", default=None, help="A folder of extra lm-eval task YAMLs.")
    args = parser.parse_args(argv)

    import torch

    from .evaluation import EvaluationError, evaluate_paths, markdown_table

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        results = evaluate_paths(args.model, args.tasks, teacher=args.teacher, output_dir=args.output_dir,
                                 limit=args.limit, batch_size=args.batch_size, device=device,
                                 include_path=args.include_path, dtype=args.dtype)
    except EvaluationError as error:
        print(f"llmkd eval: {error}", file=sys.stderr)
        return 2
    print(markdown_table(results))
    print("written: " + ", ".join(results["files"]))
    return 0


def _publish(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llmkd publish", description="Upload a llmkd train output folder (safetensors weights, config, "
        "tokenizer, recipe, evaluation, report plots) with a model card to the Hugging Face Hub. The token comes "
        "from HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("output_dir", help="The output_dir of llmkd train.")
    parser.add_argument("--repo-id", "--repo_id", dest="repo_id", required=True, help="ORG/NAME (or NAME).")
    parser.add_argument("--private", action="store_true", help="Create the repository private.")
    parser.add_argument("--revision", default=None, help="Branch to commit to (created if missing; default main).")
    parser.add_argument("--endpoint", default=None, help="Hub server (default: HF_ENDPOINT or huggingface.co).")
    parser.add_argument("--commit-message", "--commit_message", dest="commit_message", default=None)
    args = parser.parse_args(argv)

    from .hub import PublishError, publish

    try:
        published = publish(args.output_dir, args.repo_id, private=True if args.private else None,
                            revision=args.revision, endpoint=args.endpoint, commit_message=args.commit_message)
    except PublishError as error:
        print(f"llmkd publish: {error}", file=sys.stderr)
        return 1
    print(f"published {len(published['files'])} files to {published['repo_id']} ({published['revision']}): "
          f"{published['commit_url']}")
    return 0


def _cache_teacher(argv: list[str]) -> int:
    from .cache.command import main as cache_teacher_main

    return cache_teacher_main(argv)


def _upcycle(argv: list[str]) -> int:
    from .models.upcycle_command import main as upcycle_main

    return upcycle_main(argv)


def _quickstart(argv: list[str]) -> int:
    from .quickstart import main as quickstart_main

    return quickstart_main(argv)


COMMANDS = {"train": _train, "cache-teacher": _cache_teacher, "eval": _eval, "publish": _publish,
            "upcycle": _upcycle, "quickstart": _quickstart}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: llmkd {train,cache-teacher,eval,publish,upcycle,quickstart} ...\n"
              "  train       --config RECIPE.yaml [--field value ...]   distil as the recipe says\n"
              "  cache-teacher --config RECIPE.yaml [--output_dir PATH] | --verify PATH   offline teacher top-k cache\n"
              "  eval        --model PATH [--teacher PATH] --tasks T1,T2 [--limit N]   benchmarks and retention\n"
              "  publish     OUTPUT_DIR --repo-id ORG/NAME [--private] [--revision B]  upload with a model card\n"
              "  upcycle     --model PATH --output_dir DIR [--num_experts 4]   dense model -> MoE (LLaVA-MoD)\n"
              "  quickstart  [--output_dir DIR] [--method kd|taid]       offline demo on a laptop CPU (< 5 min)")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"llmkd: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
