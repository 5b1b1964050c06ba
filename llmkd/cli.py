"""The ``llmkd`` command line: ``llmkd train --config RECIPE.yaml [--field value ...]`` and ``llmkd quickstart``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger("llmkd")


METHOD_SUMMARIES = {
    "kd": "DistillTrainer: any divergence (fkl, rkl, jsd, skew_fkl, skew_rkl, tvd, abkd) mixed with CE",
    "taid": "TAIDTrainer: a target interpolated from the student to the teacher (docs/TAID.md)",
    "sinkd": "SinKDTrainer: a Sinkhorn (optimal-transport) term beside KD and CE (docs/SINKD.md)",
    "moe_mimic": "MoEMimicTrainer: LLaVA-MoD stage 1, d2d or d2s on an upcycled MoE student (docs/MOE.md)",
    "preference": "PreferenceDistillTrainer: LLaVA-MoD stage 2, DPO / kto_pair with the teacher as reference",
    "dho": "DHOTrainer: a CLIP teacher into a two-head image classifier (docs/DHO.md)",
}
RESUME_CHOICES = "a checkpoint folder, 'latest' (the newest complete checkpoint-N in output_dir; an error if none) " \
                 "or 'auto' (the newest if there is one, else a fresh start)"


def _train_parser(add_help: bool = True) -> argparse.ArgumentParser:
    methods = "\n".join(f"  {name:<11} {text}" for name, text in METHOD_SUMMARIES.items())
    parser = argparse.ArgumentParser(
        prog="llmkd train", add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distil a student from a teacher as a recipe says. Any config field can be overridden: "
                    "--learning_rate 1e-4 --max_steps 10.",
        epilog=f"methods (the recipe's `method:`):\n{methods}\n\n"
               "`llmkd train --method taid --help` lists the fields of that method's config (every "
               "transformers.TrainingArguments field works too). Relative paths in a recipe are looked up in the "
               "recipe's folder, then the current directory.",
    )
    parser.add_argument("--config", help="The recipe YAML (method, models, data, config fields).")
    parser.add_argument("--method", default=None, help="With --help: list this method's config fields.")
    parser.add_argument("--resume_from_checkpoint", default=None, help=RESUME_CHOICES + ".")
    return parser


def _print_fields(method: str) -> None:
    import dataclasses

    from transformers import TrainingArguments

    from .methods import method_entry

    config_class = method_entry(method).config_class
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    print(f"llmkd train, method {method}: {config_class.__name__} ({METHOD_SUMMARIES.get(method, '')})\n")
    for f in dataclasses.fields(config_class):
        if not f.init or f.name.startswith("_") or (f.name in base and f.default == getattr(
                TrainingArguments, f.name, f.default)):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        print(f"  --{f.name} (default {default!r}): {f.metadata.get('help', '')}")
    print(f"\nplus every transformers.TrainingArguments field; the full manual: help({config_class.__name__}).")


def _resume_target(resume: str | None, output_dir: str) -> str | None:
    from .trainers.guards import last_complete_checkpoint

    if resume not in ("latest", "auto"):
        return resume
    found = last_complete_checkpoint(output_dir)  # skips a checkpoint whose write did not finish
    if found is None and resume == "latest":
        raise FileNotFoundError(
            f"--resume_from_checkpoint latest: output_dir {output_dir!r} holds no complete checkpoint-N folder. "
            "Drop the flag to start a new run, or use --resume_from_checkpoint auto to resume only if one exists.")
    if found is None:
        logger.info("--resume_from_checkpoint auto: no checkpoint in %s, starting a new run", output_dir)
    return found


def _train(argv: list[str]) -> int:
    known, overrides = _train_parser(add_help=False).parse_known_args(argv)
    if "-h" in overrides or "--help" in overrides:
        if known.method:
            _print_fields(known.method)
        else:
            _train_parser().print_help()
        return 0
    if not known.config:
        raise RecipeUsageError("llmkd train needs --config RECIPE.yaml (see `llmkd train --help`).")

    from .recipes import load_recipe

    recipe = load_recipe(known.config, overrides, method=known.method)
    method, config = recipe.method, recipe.config
    from .methods import method_entry

    trainer_class = method_entry(method).trainer_class
    # push_to_hub: llmkd publishes once, after the evaluation and report, with its own card (llmkd.hub.publish),
    # instead of the Trainer creating the repository at start-up and uploading at every save.
    push = bool(getattr(config, "push_to_hub", False))
    config.push_to_hub = False
    if getattr(config, "eval_tasks", None):  # an unknown task fails now, not after training
        from .evaluation import validate_tasks

        validate_tasks(config.eval_tasks)
    resume = _resume_target(known.resume_from_checkpoint, config.output_dir)
    trainer = trainer_class(args=config)
    if resume:
        logger.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    written = None
    if trainer.accelerator.is_main_process:
        from .recipes import write_effective_recipe

        write_effective_recipe(recipe, config.output_dir, command="llmkd train " + " ".join(argv))
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(config.output_dir)
        from .finish import finish_run

        written = finish_run(trainer, method, push=push)  # llmkd_run.json, eval, report.html, README.md, push
    # Every rank waits for the main process's finishing work, then the process group is torn down: a rank that
    # exited with its communication threads alive was seen to abort ("terminate called without an active
    # exception") under a 2-process ZeRO-3 launch.
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    if written is not None:
        print(_saved_line(config.output_dir, written), flush=True)
    return 0


def _saved_line(output_dir: str, written: dict) -> str:
    parts = [f"llmkd train: done. The student is in {os.path.abspath(output_dir)} (with llmkd_recipe.yaml to rerun "
             "it)"]
    if written.get("results"):
        parts.append(f"evaluation: {os.path.join(output_dir, 'results.md')}")
    if written.get("report"):
        parts.append(f"report: {written['report']}")
    if written.get("card"):
        parts.append(f"card: {written['card']}")
    if written.get("published"):
        parts.append(f"published: {written['published'].get('commit_url', '')}")
    return "; ".join(parts) + "."


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


USAGE = """usage: llmkd {train,cache-teacher,eval,publish,upcycle,quickstart} ... [--debug]
  train       --config RECIPE.yaml [--field value ...]   distil as the recipe says (train --help: the methods)
  cache-teacher --config RECIPE.yaml [--output_dir PATH] | --verify PATH   offline teacher top-k cache
  eval        --model PATH [--teacher PATH] --tasks T1,T2 [--limit N]   benchmarks and retention
  publish     OUTPUT_DIR --repo-id ORG/NAME [--private] [--revision B]  upload with a model card
  upcycle     --model PATH --output_dir DIR [--num_experts 4]   dense model -> MoE (LLaVA-MoD)
  quickstart  [--output_dir DIR] [--method kd|taid]       offline demo, about 2 minutes on 2 CPU cores
A user error is reported in one line; --debug (or LLMKD_DEBUG=1) shows its traceback."""


class RecipeUsageError(ValueError):
    """The command line itself is incomplete (e.g. no --config)."""


def is_user_error(error: BaseException) -> bool:
    """Errors about the user's input (reported in one line), as opposed to bugs (reported with a traceback):
    llmkd's own error classes, invalid values (ValueError, from llmkd's or a library's validation) and missing
    files."""
    if type(error).__module__.startswith("llmkd."):
        return True
    return isinstance(error, (ValueError, FileNotFoundError, NotADirectoryError, PermissionError))


def one_line(error: BaseException) -> str:
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return f"{type(error).__name__}: {text}"


def _offline_if_unreachable(argv: list[str]) -> None:
    """``llmkd train``/``cache-teacher``: when the recipe names Hub models or data and the Hub cannot be reached,
    use the local Hugging Face cache only (HF_HUB_OFFLINE=1) instead of a minute of connection retries."""
    from .paths import hub_is_offline, hub_is_reachable, hub_names

    if hub_is_offline() or "--config" not in argv:
        return
    from .recipes import parse_overrides, read_recipe

    path = argv[argv.index("--config") + 1] if argv.index("--config") + 1 < len(argv) else None
    if path is None or not os.path.isfile(path):
        return  # the command reports it
    try:
        values = {**read_recipe(path), **parse_overrides([a for a in argv if a != "--config" and a != path])}
    except ValueError:
        return  # the command reports it
    names = hub_names(values)
    if names and not hub_is_reachable(values.get("hub_endpoint")):
        os.environ["HF_HUB_OFFLINE"] = "1"
        logger.warning("The Hugging Face Hub cannot be reached from this machine: %s will be read from the local "
                       "Hugging Face cache only (HF_HUB_OFFLINE=1).", ", ".join(map(repr, names)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LLMKD_DEBUG", "").strip() not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"llmkd: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, rest = argv[0], argv[1:]
    if "-h" not in rest and "--help" not in rest:
        if not debug:
            from .noise import quiet_known_noise

            quiet_known_noise()
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if command in ("train", "cache-teacher"):
            _offline_if_unreachable(rest)
    try:
        code = COMMANDS[command](rest)
    except Exception as error:  # noqa: BLE001 - user errors in one line, bugs with their traceback
        if debug or not is_user_error(error):
            raise
        print(f"llmkd {command}: {one_line(error)}  [traceback: --debug]", file=sys.stderr)
        return 2
    if code == 0 and command == "train":
        _exit_launched_process()
    return code


def _exit_launched_process() -> None:
    """End a finished rank of a multi-process launch at once. The run is complete and saved, every rank has
    synchronised and the process group is destroyed; what is left is the interpreter's teardown, during which the
    C++ destructors of the communication libraries were seen to abort a rank ("terminate called without an active
    exception", about one 2-process ZeRO-3 launch in five on CPU), failing a launch whose work was done."""
    from .launch import launched_world_size

    if launched_world_size() > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
