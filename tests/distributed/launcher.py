"""Run a script in N CPU processes (torchrun + gloo) for tests, the way a user's ``accelerate launch`` would.

Use from a test::

    from distributed.launcher import launch
    result = launch("tests/distributed/zero_worker.py", nprocs=2, args=["--mode", "zero3"], deepspeed=True)
    result.files["rank0.json"]          # bytes written by the children under $LLMKD_TEST_OUT

Each child runs this file as its entry point (``python -m torch.distributed.run ... launcher.py SCRIPT ARGS``):
it applies :func:`patch_accelerate_cpu_backend` and then executes SCRIPT as ``__main__``. The patch is needed
because accelerate, on a machine with no accelerator, picks no backend for a torchrun child unless ``cpu=True``
(``PartialState._prepare_backend`` returns ``(None, NO)``), so each child would believe it is alone; the patch makes
it answer ``("gloo", MULTI_CPU)``, after which accelerate initialises gloo (through ``deepspeed.comm`` when
``ACCELERATE_USE_DEEPSPEED=true``) and the real Trainer + DeepSpeed run across the processes. The patch lives
here, in the tests, on purpose: the library must never change accelerate's behaviour.

The children always get ``OMP_NUM_THREADS=1``, ``HF_HUB_OFFLINE=1``, ``TOKENIZERS_PARALLELISM=false``, a free
master port on 127.0.0.1, ``tests/`` on ``PYTHONPATH`` (for ``tests/utils.py``) and ``LLMKD_TEST_OUT``, a fresh
folder whose files come back in :attr:`LaunchResult.files`. A non-zero exit or a timeout raises
:class:`LaunchError` carrying the children's output.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = TESTS_DIR.parent
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class LaunchError(RuntimeError):
    """The launched processes failed or timed out; the message holds their stdout/stderr tails."""


@dataclass
class LaunchResult:
    returncode: int
    stdout: str
    stderr: str
    out_dir: Path
    seconds: float
    files: dict[str, bytes] = field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.out_dir / name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def patch_accelerate_cpu_backend() -> None:
    """Make accelerate use gloo/MULTI_CPU for a torchrun child when there is no CUDA device (tests only)."""
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend
    if getattr(original, "_llmkd_test_patch", False):
        return

    def _prepare_backend(self, cpu: bool = False, sagemaker_dp=False, backend: str | None = None):
        if not torch.cuda.is_available() and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return original(self, cpu, sagemaker_dp, backend)

    _prepare_backend._llmkd_test_patch = True
    PartialState._prepare_backend = _prepare_backend


def _tail(text: str, limit: int = 12000) -> str:
    return text if len(text) <= limit else "...[cut]...\n" + text[-limit:]


def _terminate(process: subprocess.Popen) -> None:
    """End the launcher and every process under it: torchrun starts each rank in a session of its own, so killing
    the launcher's process group alone would leave the ranks running (and holding the output pipes)."""
    try:
        import psutil

        descendants = psutil.Process(process.pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - psutil missing or the launcher already gone
        descendants = []
    process.send_signal(signal.SIGTERM)  # torchrun forwards it to the ranks and waits for them
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for child in descendants:
        try:
            child.kill()
        except Exception:  # noqa: BLE001 - already exited
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _run(command: list[str], env: dict[str, str], timeout: float, out_dir: Path, what: str) -> LaunchResult:
    import time

    start = time.monotonic()
    # A new session, so that a timeout can end the launcher and every child it started (one process group).
    process = subprocess.Popen(
        command, cwd=str(REPO_DIR), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _terminate(process)
        stdout, stderr = process.communicate()
        raise LaunchError(
            f"{what} timed out after {timeout:.0f} s.\n--- command: {' '.join(command)}\n"
            f"--- stdout:\n{_tail(stdout)}\n--- stderr:\n{_tail(stderr)}"
        ) from None
    seconds = time.monotonic() - start
    if process.returncode != 0:
        raise LaunchError(
            f"{what} failed with exit code {process.returncode} after {seconds:.1f} s.\n"
            f"--- command: {' '.join(command)}\n--- stdout:\n{_tail(stdout)}\n--- stderr:\n{_tail(stderr)}"
        )
    files = {p.name: p.read_bytes() for p in sorted(out_dir.iterdir()) if p.is_file()}
    return LaunchResult(process.returncode, stdout, stderr, out_dir, seconds, files)


def _child_env(out_dir: Path, env: dict[str, str] | None, deepspeed: bool) -> dict[str, str]:
    child = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_CPU"):
        child.pop(key, None)
    child.update(CHILD_ENV)
    child["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS_DIR), str(REPO_DIR)] + ([child["PYTHONPATH"]] if child.get("PYTHONPATH") else [])
    )
    child["LLMKD_TEST_OUT"] = str(out_dir)
    if deepspeed:
        child["ACCELERATE_USE_DEEPSPEED"] = "true"
    child.update(env or {})
    return child


def launch(
    script: str | os.PathLike,
    nprocs: int = 2,
    args: list[str] | tuple[str, ...] = (),
    *,
    env: dict[str, str] | None = None,
    deepspeed: bool = False,
    timeout: float = 240,
    out_dir: str | os.PathLike | None = None,
) -> LaunchResult:
    """Run ``script`` in ``nprocs`` processes with torchrun on 127.0.0.1 (gloo), the backend patch applied.

    Args:
        script: the per-rank script (path; relative paths are taken from the repository root).
        nprocs: number of processes.
        args: the script's command-line arguments.
        env: extra environment variables for the children (override the defaults above).
        deepspeed: set ``ACCELERATE_USE_DEEPSPEED=true`` so accelerate initialises through ``deepspeed.comm``.
        timeout: seconds before every process is killed and :class:`LaunchError` is raised.
        out_dir: where the children write (``$LLMKD_TEST_OUT``); a new temporary folder by default.
    Returns:
        :class:`LaunchResult` with the launcher's stdout/stderr (the children's are forwarded into them), the
        files the children wrote at the top of ``out_dir`` (name -> bytes), and the wall time.
    """
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="llmkd_dist_"))
    out.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        command = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "1", "--nproc-per-node", str(nprocs), "--node-rank", "0",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "--max-restarts", "0", "--monitor-interval", "0.5",
            str(Path(__file__).resolve()), str(Path(script) if Path(script).is_absolute() else REPO_DIR / script),
            *map(str, args),
        ]
        try:
            return _run(command, _child_env(out, env, deepspeed), timeout, out, f"{nprocs}-process run of {script}")
        except LaunchError as error:
            # The free port can be taken between free_port() and torchrun's bind: try once more on another.
            if attempt == 0 and "address already in use" in str(error).lower():
                continue
            raise
    raise AssertionError("unreachable")


def run_single(
    script: str | os.PathLike,
    args: list[str] | tuple[str, ...] = (),
    *,
    env: dict[str, str] | None = None,
    timeout: float = 240,
    out_dir: str | os.PathLike | None = None,
) -> LaunchResult:
    """Run ``script`` in one plain process (no torchrun, no patch) with the same environment and result files."""
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="llmkd_single_"))
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(script) if Path(script).is_absolute() else REPO_DIR / script), *map(str, args)]
    return _run(command, _child_env(out, env, deepspeed=False), timeout, out, f"single-process run of {script}")


_BUILD_SHM_OP = """
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None:
    builder.load()
"""


def build_deepspeed_cpu_comm_op(timeout: float = 600) -> float:
    """Build (or load from the torch-extensions cache) DeepSpeed's CPU shared-memory comm op; return the seconds.

    DeepSpeed builds this op with the machine's g++ the first time a process initialises ``deepspeed.comm`` on a
    CPU (about two minutes on 2 cores; a second or two afterwards). Building it once here, before any timed
    multi-process run, keeps each run's time to the run itself and stops two ranks from building it at once.
    Raises :class:`LaunchError` (with the compiler's output) when it cannot be built.
    """
    command = [sys.executable, "-c", _BUILD_SHM_OP]
    with tempfile.TemporaryDirectory(prefix="llmkd_dsop_") as out:
        env = _child_env(Path(out), None, deepspeed=False)
        return _run(command, env, timeout, Path(out), "DeepSpeed CPU comm op build").seconds


def _child_main() -> None:
    """Entry point of each torchrun child: patch accelerate, then run the script given as argv[1] as __main__."""
    import runpy

    if len(sys.argv) < 2:
        raise SystemExit("usage: launcher.py SCRIPT [ARGS...] (run by torchrun through launch())")
    patch_accelerate_cpu_backend()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    _child_main()


def launch_deepspeed_run(script: str | os.PathLike, out_dir, nprocs: int = 2, args: list[str] | tuple[str, ...] = (),
                         timeout: float = 300) -> LaunchResult:
    """For a test: skip (naming why) without DeepSpeed or its CPU comm op, then launch ``script`` under DeepSpeed,
    retrying once for the infrastructure (rendezvous port, JIT op cache); a real bug fails both runs."""
    import pytest

    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'llmkd[deepspeed]')")
    try:
        build_deepspeed_cpu_comm_op()
    except LaunchError as error:
        pytest.skip(f"DeepSpeed's CPU comm op (JIT-built with g++) could not be built on this machine: {error}")
    try:
        return launch(script, nprocs=nprocs, args=args, deepspeed=True, timeout=timeout, out_dir=out_dir)
    except LaunchError:
        return launch(script, nprocs=nprocs, args=args, deepspeed=True, timeout=timeout, out_dir=out_dir)
