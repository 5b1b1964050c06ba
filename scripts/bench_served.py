"""A teacher behind a vLLM server against the local teacher, one invocation (docs/SERVED_TEACHERS.md, issue 21).

    OMP_NUM_THREADS=1 .venv-vllm/bin/python scripts/bench_served.py --write     # ~5 minutes on a 2-core CPU

Needs vLLM (the vLLM environment: ``bash scripts/setup_vllm.sh``). Random-weight Llamas: a teacher
``--teacher_layers`` x ``--teacher_hidden`` and a 2 x 256 student, vocabulary ``--vocab`` (a word-level tokenizer
whose every id sequence round-trips), ``--rows`` rows of ``--seq`` random tokens. The teacher is saved and served by
``python -m vllm.entrypoints.openai.api_server`` (float32, ``--max-logprobs`` = k) on 127.0.0.1.

Measured:

1. writing the teacher cache (k = ``--top_k``): tokens/s of the local teacher pass and of the server;
2. a training step (batch ``--batch``, forward KL through the chunked engine, k = ``--top_k``): median seconds per
   step after the first, from the cache written by the local pass, with the local teacher online, from the server
   with and without the collator's prefetch, and from a replaying proxy.

On this machine the server computes on the same CPU cores as the training, so a served step pays the teacher's
forward, as an online step does; with the server on its own GPUs that forward leaves the training machine, and
what remains is llmkd's side: the requests, the JSON answers turned into targets, and the latency the prefetch
hides. The replaying proxy measures that side here: a separate process in front of the vLLM server that forwards
each request once (a warm-up pass over every row) and then answers it again from memory, so that a step pays the
whole HTTP round trip and parsing but no teacher compute. ``--write`` replaces BENCHMARKS.md's section between its markers.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import requests
import torch
from datasets import Dataset

from bench_cache_training import StepTimes, llama, word_tokenizer
from llmkd import DistillConfig, DistillTrainer
from llmkd.cache import write_teacher_cache
from llmkd.data import prepare_dataset
from llmkd.teacher_server import TeacherServer

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")
MARKERS = ("<!-- bench_served -->", "<!-- /bench_served -->")


def start_server(model_dir: str, top_k: int, seq: int, log_path: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
         "--port", str(port), "--dtype", "float32", "--max-logprobs", str(top_k), "--max-model-len", str(seq + 8),
         "--served-model-name", "teacher"],
        env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the vLLM server exited; see {log_path}")
        try:
            if requests.get(url + "/v1/models", timeout=2).ok:
                return process, url
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError("the vLLM server did not start in 600 s")


def serve_replay(port: int, upstream: str) -> None:
    """A proxy on 127.0.0.1:``port`` in front of ``upstream``: each distinct request (method, path, body) is
    forwarded once and its answer kept; repeats are answered from memory."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answers: dict[tuple, tuple[int, bytes]] = {}
    counts = {"forwarded": 0, "replayed": 0}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/replay_counts":
                answers[(method, self.path, body)] = (200, json.dumps(counts).encode())
            key = (method, self.path, body)
            counts["replayed" if key in answers else "forwarded"] += 1
            if key not in answers:
                response = requests.request(method, upstream + self.path, data=body,
                                            headers={"Content-Type": "application/json"}, timeout=600)
                answers[key] = (response.status_code, response.content)
            status, content = answers[key]
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def do_GET(self):  # noqa: N802
            self._answer("GET")

        def do_POST(self):  # noqa: N802
            self._answer("POST")

        def log_message(self, *args):
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def start_replay(upstream: str):
    import multiprocessing

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = multiprocessing.get_context("spawn").Process(target=serve_replay, args=(port, upstream), daemon=True)
    process.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if requests.get(url + "/v1/models", timeout=2).ok:
                return process, url
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError("the replaying proxy did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--teacher_hidden", type=int, default=512)
    parser.add_argument("--teacher_layers", type=int, default=4)
    parser.add_argument("--top_k", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)

    folder = tempfile.mkdtemp(prefix="llmkd_bench_served_")
    tokenizer = word_tokenizer(args.vocab)
    generator = torch.Generator().manual_seed(0)
    rows = [{"text": " ".join(f"t{i}" for i in torch.randint(0, args.vocab - 1, (args.seq,),
                                                              generator=generator).tolist())}
            for _ in range(args.rows)]
    dataset = Dataset.from_list(rows)
    student = llama(args.vocab, 256, 2, seed=1)
    teacher = llama(args.vocab, args.teacher_hidden, args.teacher_layers, seed=2).eval()
    teacher_dir = os.path.join(folder, "teacher")
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    prepared = prepare_dataset(dataset, tokenizer, max_length=args.seq, completion_only_loss=False)
    server, url = start_server(teacher_dir, args.top_k, args.seq, os.path.join(folder, "server.log"))
    lines = []
    try:
        cache_rates = {}
        settings = dict(top_k=args.top_k, temperature=1.0, shard_rows=16, progress=False)
        for mode in ("local", "server"):
            source = teacher if mode == "local" else TeacherServer(url, concurrency=args.concurrency)
            started = time.perf_counter()
            cache = write_teacher_cache(source, prepared, tokenizer, os.path.join(folder, f"cache-{mode}"),
                                        batch_size=args.batch if mode == "local" else 4 * args.concurrency,
                                        **settings)
            cache_rates[mode] = cache.num_tokens / (time.perf_counter() - started)
            print(f"cache from the {mode} teacher: {cache_rates[mode]:.0f} tokens/s", flush=True)

        replay, replay_url = start_replay(url)
        warm = TeacherServer(replay_url, concurrency=args.concurrency)
        warm.check_tokenizer(tokenizer)
        warm.score_rows([row["input_ids"] for row in prepared], args.top_k)  # every row's answer, kept
        warm.close()
        before = requests.get(replay_url + "/replay_counts", timeout=10).json()
        steps = args.rows // args.batch
        medians = {}
        for mode in ("cache", "online", "served", "served_no_prefetch", "served_replay"):
            timer = StepTimes()
            fields = {"cache": {"teacher_cache": os.path.join(folder, "cache-local")}, "online": {},
                      "served": {"teacher_server": url}, "served_no_prefetch": {"teacher_server": url},
                      "served_replay": {"teacher_server": replay_url}}[mode]
            config = DistillConfig(
                output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=steps,
                learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to="none", disable_tqdm=True,
                max_length=args.seq, completion_only_loss=False, kd_ratio=1.0, verify_logit_head=False,
                teacher_server_top_k=args.top_k, teacher_server_concurrency=args.concurrency, **fields)
            extra = {"teacher_model": teacher} if mode == "online" else {}
            trainer = DistillTrainer(model=copy.deepcopy(student), args=config, train_dataset=dataset,
                                     processing_class=tokenizer, callbacks=[timer], **extra)
            if mode == "served_no_prefetch":
                trainer.data_collator.on_batch = None
            trainer.train()
            medians[mode] = statistics.median(timer.times[1:])
            print(f"{mode}: median {medians[mode]:.3f} s/step over steps 2..{steps}", flush=True)
        after = requests.get(replay_url + "/replay_counts", timeout=10).json()
        forwarded = after["forwarded"] - before["forwarded"]
        print(f"replaying proxy during its training mode: {after['replayed'] - before['replayed'] - 1} requests "
              f"replayed, {forwarded} forwarded", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        if "replay" in locals():
            replay.kill()

    command = "OMP_NUM_THREADS=1 .venv-vllm/bin/python scripts/bench_served.py --write"
    lines += [
        f"`{command}`", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python "
        f"{platform.python_version()}, torch {torch.__version__}. Teacher {args.teacher_layers} x "
        f"{args.teacher_hidden}, student 2 x 256, vocabulary {args.vocab}, {args.rows} rows of {args.seq} tokens, "
        f"batch {args.batch}, k = {args.top_k}, {args.concurrency} requests in flight; the server (vLLM CPU, "
        "float32) on the same cores. The replaying proxy answered the training's requests from memory "
        f"({forwarded} of them forwarded to the server).", "",
        "| teacher cache written by | tokens/s | / local |", "|---|---|---|",
        f"| the local teacher pass | {cache_rates['local']:.0f} | 1.00x |",
        f"| the vLLM server | {cache_rates['server']:.0f} | {cache_rates['server'] / cache_rates['local']:.2f}x |",
        "", "| training step, teacher targets from | sec/step | / cache |", "|---|---|---|",
    ]
    names = {"cache": "the cache (local pass, k = top_k)", "online": "the local teacher, online",
             "served": "the server, prefetched", "served_no_prefetch": "the server, no prefetch",
             "served_replay": "a proxy replaying the server's answers, prefetched"}
    for mode, name in names.items():
        lines.append(f"| {name} | {medians[mode]:.3f} | {medians[mode] / medians['cache']:.2f}x |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.write:
        with open(BENCHMARKS) as handle:
            text = handle.read()
        start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
        with open(BENCHMARKS, "w") as handle:
            handle.write(text[:start] + "\n" + table + "\n" + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
