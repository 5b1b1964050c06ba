"""On one CUDA GPU: llmkd's correctness in bf16 and fp32, and its speed and memory at real model shapes (issue 17).

    python scripts/gpu_check.py --out_dir $OUT           # on the GPU: about 5 minutes; BENCHMARKS.md section
    python scripts/gpu_check.py --smoke                  # the same code on the CPU at tiny shapes (~1 minute)
    python scripts/gpu_check.py --smoke --benchmarks /tmp/B.md   # ... and write its section there

Part a, correctness (scripts/gpu_check_correctness.py, scripts/gpu_check_trainers.py): the chunked engine and the
dense path against a float64 reference for every divergence, TAID, a cached top-k teacher and Gemma soft-capping,
values and gradients, on the real heads, in float32 and bfloat16, with bounds derived from each dtype's rounding; one
DistillTrainer, TAIDTrainer, cache-mode and Gemma 2 step on small models. Part b, speed (scripts/gpu_check_speed.py):
seconds per step, tokens/s, peak memory and MFU of the floor, a stronger floor (fused linear CE), llmkd's forward KL,
TAID and cache mode, and TRL's GKDTrainer and DistillationTrainer, a Qwen2.5-0.5B-shaped student and a
Qwen2.5-7B-shaped teacher (random weights, nothing downloaded), bf16, sequence 2048, the floor's largest batch.

Each part (on the GPU each speed mode) runs in a fresh process under a time limit, so that an out-of-memory error
or a hang in one is reported and the rest still run; ``--time_budget_s`` bounds the whole run (a mode that would
start after it is reported as skipped). Progress lines carry timestamps. The tables go between the markers of the
``gpu_check`` section of BENCHMARKS.md (``--smoke``: section ``gpu_check_smoke``, and only into a file given with
``--benchmarks``); ``--out_dir`` also receives the raw results (gpu_check.json), the section and the updated
BENCHMARKS.md. Exit status: 1 when a correctness check failed or its part did not finish, 2 when an llmkd speed
mode failed other than by running out of memory or time, else 0.

MFU counts model FLOPs: 6 N_s per token for the student's forward and backward and 2 N_t for the teacher's forward
(N: the parameters in matrix products: all but the input embedding, a tied head once), plus causal attention
(2 L S d per token forward, x3 with the backward), against the dense bf16 peak of the GPU's datasheet (H200 and
H100 SXM: 989.4 TFLOP/s; an H200 of this workplace measured about 790 on an 8192^3 product).

Versions. The GPU machine has torch 2.11 and transformers 5.17; llmkd needs transformers >= 5.23 (its output-head
interception and trainers rely on internals verified on 5.23/5.24: constraints.txt), so scripts/gpu_wheels.sh
carries transformers 5.24.0 (about 12 MB) with the other packages the machine lacks (trl, datasets, liger-kernel,
...); the llmkd package travels as source (this checkout). Run ``bash scripts/gpu_wheels.sh`` here first: it prints
the exact command to give the device.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
# the llmkd source of this checkout (on the GPU machine llmkd is not installed: it travels as source)
sys.path[:0] = [SCRIPTS, os.path.dirname(SCRIPTS)]
from bench_step import BENCHMARKS, write_section  # noqa: E402
from gpu_check_common import SHAPES, log  # noqa: E402
from gpu_check_speed import MODES as SPEED_MODES  # noqa: E402
LLMKD_MODES = ("floor_fused", "kd", "taid", "cache")
MODE_NAMES = {
    "floor": "floor: teacher fwd with head, student fwd+bwd with the model's CE, AdamW",
    "floor_fused": "stronger floor: the same, the student's CE a fused linear cross-entropy",
    "kd": "llmkd DistillTrainer, forward KL (kd_ratio 0.5)",
    "taid": "llmkd TAIDTrainer (kd_ratio 0.5)",
    "cache": "llmkd DistillTrainer from a top-64 teacher cache",
    "gkd": "TRL GKDTrainer (lmbda=0, beta=0)",
    "distillation": "TRL DistillationTrainer (beta=0, completions from the data)",
}
ROW, RESULT = "GPU_CHECK_ROW ", "GPU_CHECK_RESULT "  # a worker's lines on stdout: each row when done, then the end
PACKAGES = ("torch", "transformers", "accelerate", "trl", "datasets", "peft", "liger-kernel", "triton", "safetensors",
            "tokenizers", "pyarrow", "huggingface-hub")
STARTED = time.monotonic()


# --------------------------------------------------------------------------------------------------- workers
def worker(args) -> None:
    """A part's process: each row as one JSON line on stdout as soon as it is done (a part stopped at its time limit
    keeps the rows it finished), then its environment."""
    import torch

    import gpu_check_common as common

    shape_name = "smoke" if args.smoke else "gpu"
    device = common.pick_device(args.smoke)
    if args.worker == "correctness":
        import itertools

        import gpu_check_correctness
        import gpu_check_trainers

        common.set_full_precision_products()
        rows = itertools.chain(gpu_check_correctness.engine_rows(common.SHAPES[shape_name], device, args.inject_fault),
                               gpu_check_trainers.trainer_rows(common.SHAPES[shape_name], device))
    else:
        import gpu_check_speed

        rows = gpu_check_speed.run_modes(args.worker_modes, shape_name, args.smoke, args.batch)
    for row in rows:
        print(ROW + json.dumps(row), flush=True)
    environment = {"device": common.peak_flops(device)[1], "torch": torch.__version__,
                   "cuda": torch.version.cuda, "threads": torch.get_num_threads()}
    print(RESULT + json.dumps(environment), flush=True)


def run_worker(args, arguments: list[str], limit_s: float) -> dict:
    """Run ``gpu_check.py --worker ...`` for at most ``limit_s`` seconds: ``{"rows": [...], "environment": {...}}``,
    with ``"failed": reason`` (and ``"timed_out": True``) when it did not finish; ``rows`` holds what it finished."""
    command = [sys.executable, os.path.abspath(__file__), *arguments] + (["--smoke"] if args.smoke else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    outcome = {}
    try:
        stdout, _ = process.communicate(timeout=max(limit_s, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, _ = process.communicate()
        outcome = {"failed": f"ran past its time limit of {limit_s:.0f} s", "timed_out": True}
    lines = stdout.splitlines()
    outcome["rows"] = [json.loads(line[len(ROW):]) for line in lines if line.startswith(ROW)]
    ends = [json.loads(line[len(RESULT):]) for line in lines if line.startswith(RESULT)]
    outcome["environment"] = ends[-1] if ends else {}
    if "failed" not in outcome and (process.returncode != 0 or not ends):
        outcome["failed"] = f"exit status {process.returncode} (its traceback is in the log above)"
    return outcome


class Budget:
    """The seconds left of ``--time_budget_s``."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def correctness_part(args, budget: Budget) -> dict:
    log("correctness: the engine and the dense path against float64, then one step of each trainer")
    result = run_worker(args, ["--worker", "correctness"] + (["--inject_fault"] if args.inject_fault else []),
                        min(args.correctness_timeout_s, budget.left()))
    failed = [row for row in result["rows"] if not row["passed"]]
    log(f"correctness: {len(result['rows']) - len(failed)}/{len(result['rows'])} checks passed"
        + (f"; the part did not finish: {result['failed']}" if "failed" in result else ""))
    return result


def speed_part(args, budget: Budget) -> dict:
    """Every speed mode: in one process with ``--smoke``, else one process per mode at the floor's batch."""
    groups = [list(args.modes)] if args.smoke else [[mode] for mode in args.modes]
    rows, environment, batch = [], {}, None
    for group in groups:
        left = budget.left()
        if left < args.min_mode_s:
            rows += [{"mode": m, "skipped": f"the time budget (--time_budget_s {args.time_budget_s:g}) was spent"}
                     for m in group]
            continue
        limit = min(args.mode_timeout_s * len(group), left)
        log(f"speed: {', '.join(group)} (limit {limit:.0f} s)")
        arguments = ["--worker", "speed", "--worker_modes", *group] + ([f"--batch={batch}"] if batch else [])
        result = run_worker(args, arguments, limit)
        environment = result["environment"] or environment
        finished = {row["mode"] for row in result["rows"]}
        for row in result["rows"]:
            if row["mode"] == "floor" and "batch" in row:
                batch = row["batch"]
            rows.append(row)
        key = "skipped" if result.get("timed_out") else "failed"
        rows += [{"mode": m, key: result["failed"]} for m in group if m not in finished and "failed" in result]
    return {"rows": rows, "environment": environment}


# --------------------------------------------------------------------------------------------------- report
def cell(row: dict) -> str:
    """A correctness row as a table cell: its largest error / bound and the quantity, or its error."""
    return row.get("error") or f"{row['ratio']:.3g} ({row['worst']})"


def correctness_table(result: dict) -> list[str]:
    rows = result["rows"]
    failed = sum(not row["passed"] for row in rows)
    unfinished = f" **The part did not finish** ({result['failed']}): the rows below are those it finished." \
        if "failed" in result else ""
    lines = [f"Correctness: {len(rows) - failed} of {len(rows)} checks passed.{unfinished} Each cell is the largest error / bound "
             "over the compared quantities (loss, metric sums, gradients of the hidden states and the head; the "
             "trainer rows compare the chunked and the dense path of the trainer itself, then take one optimizer "
             "step), with the quantity that came closest; <= 1 passes. Bounds: the docstrings of "
             "scripts/gpu_check_correctness.py and scripts/gpu_check_trainers.py.", "",
             "| check | dtype | chunked engine | dense path | result |", "|---|---|---|---|---|"]
    by_check: dict[tuple, dict] = {}
    for row in rows:
        by_check.setdefault((row["check"], row["dtype"]), {})[row["path"]] = row
    for (check, dtype), paths in by_check.items():
        # engine cases have a chunked and a dense row; trainer steps and the soft-cap sensitivity one row
        cells = [cell(paths[path]) if path in paths else "-" for path in ("chunked", "dense")]
        if "chunked" not in paths:
            cells[0] = cell(next(iter(paths.values())))
        verdict = "pass" if all(row["passed"] for row in paths.values()) else "**FAIL**"
        lines.append(f"| {check} | {dtype} | {cells[0]} | {cells[1]} | {verdict} |")
    return lines + [""]


def time_ratio(row: dict, base: dict) -> float | None:
    """``row``'s step time over ``base``'s at the same batch; at different batches (one ran out of memory) the
    inverse ratio of their tokens per second; None when either did not run."""
    if "sec_per_step" not in row or "sec_per_step" not in base:
        return None
    if row["batch"] == base["batch"]:
        return row["sec_per_step"] / base["sec_per_step"]
    return base["tokens_per_s"] / row["tokens_per_s"]


def speed_table(result: dict, smoke: bool) -> list[str]:
    rows = {row["mode"]: row for row in result["rows"]}
    base = rows.get("floor_fused", {})
    lines = ["| mode | batch | sec/step | tokens/s | peak memory (GiB) | MFU | time / stronger floor | "
             "memory - stronger floor (GiB) |", "|---|---|---|---|---|---|---|---|"]
    # at another batch than the stronger floor's (out of memory), time compares by tokens/s and memory not at all
    for mode in SPEED_MODES:
        row = rows.get(mode)
        if row is None:
            continue
        name = MODE_NAMES[mode] + (f" [{row['implementation']}]" if row.get("implementation") else "")
        if "sec_per_step" not in row:
            reason = row.get("failed") or row.get("skipped")
            lines.append(f"| {name} | {'failed' if 'failed' in row else 'skipped'}: {reason} | | | | | | |")
            continue
        mfu = "-" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%"
        ratio = time_ratio(row, base)
        ratio = "-" if ratio is None else f"{ratio:.2f}x"
        extra = f"{row['peak_gib'] - base['peak_gib']:+.2f}" if base.get("batch") == row["batch"] else "-"
        notes = f" ({'; '.join(row['notes'])})" if row.get("notes") and mode != "floor" else ""
        lines.append(f"| {name} | {row['batch']}{notes} | {row['sec_per_step']:.3f} | {row['tokens_per_s']:.0f} | "
                     f"{row['peak_gib']:.2f} | {mfu} | {ratio} | {extra} |")
    if "floor" in rows and rows["floor"].get("notes"):
        lines += ["", f"The floor's batch search: {'; '.join(rows['floor']['notes'])}."]
    if smoke:
        lines += ["", "(--smoke: tiny shapes on the CPU; peak memory is the process's peak resident memory; the "
                      "figures only show that every mode runs.)"]
    return lines + [""]


def targets_table(result: dict) -> list[str]:
    """The issue's targets at these shapes, measured (reported; they do not change the exit status)."""
    rows = {row["mode"]: row for row in result["rows"] if "sec_per_step" in row}
    lines = ["| target | measured | met |", "|---|---|---|"]

    def add(target: str, value: float | None, limit: float, unit: str = "x") -> None:
        if value is None:
            lines.append(f"| {target} | not measured | - |")
        else:
            lines.append(f"| {target} | {value:.2f}{unit} | {'yes' if value <= limit else '**no**'} |")

    def ratio(mode, base):
        return time_ratio(rows.get(mode, {}), rows.get(base, {}))

    for mode, name in (("kd", "forward KL"), ("taid", "TAID")):
        add(f"{name}: time <= 1.15x the stronger floor's", ratio(mode, "floor_fused"), 1.15)
        if mode in rows and "floor_fused" in rows and rows[mode]["batch"] == rows["floor_fused"]["batch"]:
            budget = rows["floor_fused"]["peak_gib"] + rows[mode].get("chunk_buffers_gib", 0.0)
            add(f"{name}: peak memory <= the stronger floor's + one chunk's buffers "
                f"({rows[mode].get('chunk_buffers_gib', 0.0):.2f} GiB)", rows[mode]["peak_gib"] / budget, 1.0)
        for trl in ("gkd", "distillation"):
            add(f"{name}: faster than {MODE_NAMES[trl].split(' (')[0]} (time ratio)", ratio(mode, trl), 1.0)
    add("cache mode: faster than the floor (time ratio)", ratio("cache", "floor"), 1.0)
    return lines + [""]


def package_versions() -> str:
    """The versions this Python would import (a package from --target /tmp/site first, through PYTHONPATH)."""
    from importlib import metadata

    versions = []
    for package in PACKAGES:
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} absent")
    return ", ".join(versions)


def machine_line(environments: list[dict]) -> str:
    import platform

    environment = next((e for e in environments if e), {})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    return (f"Machine: {environment.get('device', 'unknown')}, {os.cpu_count()} CPU cores; Python "
            f"{platform.python_version()}, CUDA {environment.get('cuda')}, {package_versions()}; llmkd at "
            f"{commit}; {time.strftime('%Y-%m-%d')}.")


def section(args, correctness: dict, speed: dict) -> list[str]:
    command = "python scripts/gpu_check.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [f"`{command.strip()}`", "", machine_line([speed.get("environment"), correctness.get("environment")]),
             ""]
    if correctness:
        lines += correctness_table(correctness)
    if speed:
        shapes = SHAPES["smoke" if args.smoke else "gpu"]
        lines += [f"Steps (bf16, sequence {shapes['seq']}; median of {shapes['steps']} measured steps after "
                  f"{shapes['warmup']} warm-up):", "", *speed_table(speed, args.smoke)]
        lines += ["Targets of issue 17 at these shapes (time ratios: step times at the same batch, below 1 is faster; "
                  "at different batches the inverse ratio of tokens per second):", "", *targets_table(speed)]
    return lines


def exit_status(correctness: dict, speed: dict) -> int:
    """1: a correctness check failed or its part did not finish; 2: an llmkd speed mode failed (not out of memory
    or time); else 0."""
    if correctness and ("failed" in correctness or not all(row["passed"] for row in correctness["rows"])):
        return 1
    for row in (speed or {}).get("rows", []):
        if row["mode"] in LLMKD_MODES and "failed" in row and "out of memory" not in row["failed"]:
            return 2
    return 0


def write_outputs(args, lines: list[str], correctness: dict, speed: dict) -> None:
    name = "gpu_check_smoke" if args.smoke else "gpu_check"
    if args.benchmarks:
        write_section(args.benchmarks, name, lines)
        log(f"wrote the {name} section of {args.benchmarks}")
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "gpu_check.json"), "w", encoding="utf-8") as handle:
            json.dump({"correctness": correctness, "speed": speed}, handle, indent=1)
        with open(os.path.join(args.out_dir, "gpu_check_section.md"), "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        if args.benchmarks and os.path.exists(args.benchmarks):
            with open(args.benchmarks, encoding="utf-8") as source, \
                    open(os.path.join(args.out_dir, "BENCHMARKS.md"), "w", encoding="utf-8") as target:
                target.write(source.read())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU at tiny shapes")
    parser.add_argument("--benchmarks", default=None,
                        help="the file whose section is rewritten (default: BENCHMARKS.md on the GPU; none with "
                             "--smoke)")
    parser.add_argument("--out_dir", default=None, help="also write gpu_check.json, the section and BENCHMARKS.md here")
    parser.add_argument("--parts", nargs="+", choices=("correctness", "speed"), default=["correctness", "speed"])
    parser.add_argument("--modes", nargs="+", choices=SPEED_MODES, default=list(SPEED_MODES))
    parser.add_argument("--time_budget_s", type=float, default=None,
                        help="the whole run's seconds (default 400 on the GPU, 900 with --smoke)")
    parser.add_argument("--correctness_timeout_s", type=float, default=None, help="default 150 (GPU) / 600")
    parser.add_argument("--mode_timeout_s", type=float, default=None, help="per speed mode; default 90 (GPU) / 120")
    parser.add_argument("--min_mode_s", type=float, default=None,
                        help="do not start a speed mode with fewer seconds left (default 30 / 5)")
    parser.add_argument("--worker", choices=("correctness", "speed"), help=argparse.SUPPRESS)
    parser.add_argument("--worker_modes", nargs="+", choices=SPEED_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--inject_fault", action="store_true", help=argparse.SUPPRESS)  # for the test: must fail
    args = parser.parse_args(argv)
    defaults = dict(time_budget_s=(900, 400), correctness_timeout_s=(600, 150), mode_timeout_s=(120, 90),
                    min_mode_s=(5, 30))
    for key, (smoke_value, gpu_value) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, float(smoke_value if args.smoke else gpu_value))
    if args.benchmarks is None and not args.smoke and not args.worker:
        args.benchmarks = BENCHMARKS
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    budget = Budget(args.time_budget_s)
    log(f"{'smoke run on the CPU' if args.smoke else 'GPU run'}: parts {args.parts}, time budget "
        f"{args.time_budget_s:.0f} s; {package_versions()}")
    correctness = correctness_part(args, budget) if "correctness" in args.parts else {}
    speed = speed_part(args, budget) if "speed" in args.parts else {}
    lines = section(args, correctness, speed)
    print("\n".join(lines), flush=True)
    write_outputs(args, lines, correctness, speed)
    status = exit_status(correctness, speed)
    log(f"done in {time.monotonic() - STARTED:.0f} s, exit status {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
