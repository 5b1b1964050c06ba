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
    trainer = trainer_class(args=config)
    resume = known.resume_from_checkpoint
    if resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(config.output_dir)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    if trainer.accelerator.is_main_process:
        shutil.copyfile(known.config, os.path.join(config.output_dir, "llmkd_recipe.yaml"))
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(config.output_dir)
    return 0


def _cache_teacher(argv: list[str]) -> int:
    from .cache.command import main as cache_teacher_main

    return cache_teacher_main(argv)


def _quickstart(argv: list[str]) -> int:
    from .quickstart import main as quickstart_main

    return quickstart_main(argv)


COMMANDS = {"train": _train, "cache-teacher": _cache_teacher, "quickstart": _quickstart}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: llmkd {train,cache-teacher,quickstart} ...\n"
              "  train       --config RECIPE.yaml [--field value ...]   distil as the recipe says\n"
              "  cache-teacher --config RECIPE.yaml [--output_dir PATH] | --verify PATH   offline teacher top-k cache\n"
              "  quickstart  [--output_dir DIR] [--method taid]          offline demo on a laptop CPU (< 5 min)")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"llmkd: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
