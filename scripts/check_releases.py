"""See dependency drift before users do: install llmkd with other releases in a scratch venv and run the suite there.

    python scripts/check_releases.py                      # the newest releases pyproject.toml allows, whole suite
    python scripts/check_releases.py --lowest             # the Hugging Face stack at pyproject's lower bounds
    python scripts/check_releases.py --unbounded          # the newest releases, ignoring pyproject's upper bounds
    python scripts/check_releases.py -- tests/test_moe_mimic.py -x   # pytest arguments after --
    python scripts/check_releases.py --write-constraints  # after a verified upgrade: constraints.txt from .venv

What it does, in order:
1. creates (or reuses) a venv outside the checkout (``--venv``, default /tmp/llmkd-releases-<mode>), installs torch
   as scripts/setup.sh does (``LLMKD_TORCH``, default torch==2.13.0), then ``.[all]`` WITHOUT constraints.txt:
   pip picks the newest releases within pyproject's bounds (``--unbounded`` drops the upper bounds; ``--lowest``
   pins transformers, trl, accelerate, peft, datasets, deepspeed, lm-eval and evaluate to their lower bounds);
2. prints every package whose resolved version differs from constraints.txt (the set the suite was verified on);
3. runs pytest from the checkout with that venv's python (whole suite unless pytest arguments are given) and ends
   with pytest's exit code; ``--report FILE`` writes the versions, differences and pytest's summary line as JSON.

A newest run whose resolved set equals constraints.txt has nothing new to test: it says so and exits 0 without
running the suite (``--always-test`` runs it anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
HEADER = """\
# The exact versions the llmkd test suite was verified on ({python}, torch {torch}, {date}).
# scripts/setup.sh installs with '-c constraints.txt' so a new machine gets this tested set; torch is pinned
# separately by setup.sh (LLMKD_TORCH), so CUDA builds can be chosen. Regenerate after a verified upgrade with
#   .venv/bin/python scripts/check_releases.py --write-constraints
# To test newer releases instead:  LLMKD_CONSTRAINTS=none bash scripts/setup.sh   (or scripts/check_releases.py)
"""


def canonical(name: str) -> str:
    """PEP 503 normalised project name: ``Lm_Eval`` -> ``lm-eval``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict[str, str]:
    """``name==version`` lines (comments, editable and unpinned lines ignored) -> {canonical name: version}."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def direct_requirements(extras: tuple[str, ...] = ("all",)) -> list[str]:
    """The requirement strings of pyproject.toml: dependencies plus the named extras, nested extras expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    requirements, pending, seen = list(project["dependencies"]), list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in optional[extra]:
            nested = re.fullmatch(r"llmkd\[(.+)\]", requirement.replace(" ", ""))
            if nested:
                pending.extend(nested.group(1).split(","))
            else:
                requirements.append(requirement)
    return requirements


# --lowest pins these (the Hugging Face stack whose APIs llmkd calls) to their lower bounds; the other dependencies
# (numpy-era packages such as scikit-learn or matplotlib, whose oldest releases predate numpy 2) resolve as usual.
LOWEST_CHECKED = ("transformers", "trl", "accelerate", "peft", "datasets", "deepspeed", "lm-eval", "evaluate")


def lowest_pins(requirements: list[str]) -> list[str]:
    """``name>=X[,<Y]`` -> ``name==X`` for the packages of LOWEST_CHECKED; other requirements unchanged."""
    pins = []
    for requirement in requirements:
        match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[[^\]]*\])?\s*(.*)", requirement)
        name, spec = match.group(1), match.group(2)
        lower = re.search(r">=\s*([0-9][^,;\s]*)", spec)
        pins.append(f"{name}=={lower.group(1)}" if lower and canonical(name) in LOWEST_CHECKED else requirement)
    return pins


def without_upper_bounds(requirements: list[str]) -> list[str]:
    """Drop ``<``/``<=`` clauses: ``transformers>=5.19,<5.25`` -> ``transformers>=5.19``."""
    out = []
    for requirement in requirements:
        match = re.match(r"\s*([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?)\s*(.*)", requirement)
        clauses = [c.strip() for c in match.group(2).split(",") if c.strip() and not c.strip().startswith("<")]
        out.append(match.group(1) + ",".join(clauses))
    return out


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", shlex.join(command), flush=True)
    return subprocess.run(command, check=True, **kwargs)


def freeze(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--exclude-editable"], check=True,
                         capture_output=True, text=True).stdout
    return read_pins(out)


def install(venv: Path, mode: str) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", str(venv)])
    run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    torch = os.environ.get("LLMKD_TORCH", "torch==2.13.0")
    if subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0:
        run([str(python), "-m", "pip", "install", "--quiet", *shlex.split(torch)])
    # torch stays the build installed above (a CPU or a CUDA build): every upgrade below is constrained to it,
    # otherwise pip's eager upgrade of torch's dependents would replace it with the newest (CUDA) build
    installed_torch = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], check=True,
                                     capture_output=True, text=True).stdout.strip()
    pin = venv / "torch-constraint.txt"
    pin.write_text(f"torch=={installed_torch}\n")
    requirements = [r for r in direct_requirements() if canonical(re.split(r"[<>=!~\[ ;]", r)[0]) != "torch"]
    if mode == "lowest":
        requirements = lowest_pins(requirements)
    elif mode == "unbounded":
        requirements = without_upper_bounds(requirements)
    env = dict(os.environ, DS_BUILD_OPS="0")
    upgrade = [] if mode == "lowest" else ["--upgrade", "--upgrade-strategy", "eager"]
    # the requirements first (so --lowest pins hold), then llmkd itself without re-resolving its dependencies
    run([str(python), "-m", "pip", "install", "--quiet", "-c", str(pin), *upgrade, *requirements], env=env)
    run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ROOT)], env=env)
    # Liger's chunked losses run on CPU without its triton dependency (as scripts/setup.sh installs them)
    liger = [r for r in direct_requirements(("liger",)) if canonical(re.split(r"[<>=\[ ]", r)[0]) == "liger-kernel"]
    run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", *upgrade, *liger], env=env)
    return python


def differences(resolved: dict[str, str], verified: dict[str, str]) -> list[tuple[str, str, str]]:
    names = sorted(set(resolved) | set(verified))
    return [(n, verified.get(n, "-"), resolved.get(n, "-")) for n in names
            if n != "torch" and verified.get(n) != resolved.get(n)]


def write_constraints(python: Path) -> None:
    import datetime

    pins = freeze(python)
    version = subprocess.run([str(python), "-c", "import sys, torch; print(sys.version.split()[0], torch.__version__)"],
                             check=True, capture_output=True, text=True).stdout.split()
    lines = [f"{name}=={pins[name]}" for name in sorted(pins) if name not in ("torch", "llmkd")]
    CONSTRAINTS.write_text(HEADER.format(python=f"Python {version[0]}", torch=version[1],
                                         date=datetime.date.today().isoformat()) + "\n".join(lines) + "\n")
    print(f"wrote {CONSTRAINTS} ({len(lines)} packages)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lowest", action="store_true", help="the Hugging Face stack at its lowest allowed versions")
    mode.add_argument("--unbounded", action="store_true", help="the newest releases, pyproject's upper bounds dropped")
    mode.add_argument("--write-constraints", action="store_true",
                      help="write constraints.txt from the checkout's .venv (after a verified run) and exit")
    parser.add_argument("--venv", type=Path, help="scratch venv (default /tmp/llmkd-releases-<mode>)")
    parser.add_argument("--always-test", action="store_true", help="run the suite even if nothing changed")
    parser.add_argument("--no-tests", action="store_true", help="install and list the differences only")
    parser.add_argument("--report", type=Path, help="write versions, differences and pytest's summary as JSON")
    args = parser.parse_args(argv)
    if args.write_constraints:
        write_constraints(ROOT / ".venv" / "bin" / "python")
        return 0
    name = "lowest" if args.lowest else "unbounded" if args.unbounded else "newest"
    venv = args.venv or Path(f"/tmp/llmkd-releases-{name}")
    python = install(venv, name)
    resolved, verified = freeze(python), read_pins(CONSTRAINTS.read_text())
    changed = differences(resolved, verified)
    print(f"\n{len(changed)} packages differ from constraints.txt ({name} releases):")
    for package, old, new in changed:
        print(f"  {package:28s} verified {old:16s} -> {new}")
    report = {"mode": name, "resolved": resolved, "differences": changed, "pytest": None}
    code = 0
    if args.no_tests or (name == "newest" and not changed and not args.always_test):
        if not args.no_tests:
            print("The newest releases are the verified set: nothing new to test (--always-test runs the suite).")
    else:
        env = dict(os.environ, PYTHONNOUSERSITE="1")
        proc = subprocess.run([str(python), "-m", "pytest", *pytest_args], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sys.stdout.write(proc.stdout)
        summary = [line for line in proc.stdout.splitlines() if re.search(r"\b(passed|failed|error)", line)]
        report["pytest"] = {"exit_code": proc.returncode, "summary": summary[-1] if summary else None}
        code = proc.returncode
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
