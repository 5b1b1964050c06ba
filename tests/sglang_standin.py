"""A stand-in for an SGLang server, for tests/test_sglang_server.py: a real HTTP server on 127.0.0.1 that answers
the part of SGLang's API llmkd uses, with the answers of a real (tiny) transformers model.

SGLang itself cannot run here: its CPU backend needs sgl-kernel built from source for the machine's CPU, which the
package registry does not carry (vLLM has a CPU wheel: tests/test_served_teacher.py runs the real vLLM server). So
the protocol is written from SGLang's documentation of its native API (docs "Sampling Parameters" / "Native APIs",
``io_struct.GenerateReqInput``):

- ``GET /v1/models``: ``{"data": [{"id", "root", "max_model_len"}]}`` (the OpenAI-compatible model list);
- ``GET /get_model_info``: ``{"model_path", "tokenizer_path", "is_generation"}`` (SGLang only);
- ``POST /tokenize`` ``{"prompt", "add_special_tokens"}``: ``{"tokens", "count", "max_model_len"}``;
- ``POST /generate`` ``{"input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
  "return_text_in_logprobs"}``: ``{"text", "output_ids", "meta_info": {"input_token_logprobs",
  "input_top_logprobs", "output_token_logprobs", ...}}``, each log-probability entry ``[logprob, token_id, text]``,
  the first prompt token's logprob ``None`` and its top list ``None`` (SGLang pads position 0 when
  ``logprob_start_len`` is 0). Log-probabilities are the model's float32 ``log_softmax`` (temperature 1), sent as
  JSON floats of float32 values, as SGLang's ``tolist()`` sends them.

Requests other than these, or without the fields llmkd must send, get SGLang-style 4xx answers.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class SGLangStandIn:
    """Serve ``model`` (a causal LM, float32) and ``tokenizer`` as SGLang would, under ``name``; ``stop()`` ends it.

    ``requests`` counts the ``/generate`` calls; ``fail_next`` answers that many of them with HTTP 503 first."""

    def __init__(self, model, tokenizer, *, name: str = "tiny-teacher", root: str = "/models/tiny",
                 max_model_len: int = 256):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name, self.root, self.max_model_len = name, root, max_model_len
        self.requests, self.fail_next = 0, 0
        self._lock = threading.Lock()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------------------------------------ answers
    def generate(self, body: dict) -> tuple[int, dict]:
        ids = body.get("input_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
            return 400, {"error": {"message": "input_ids must be a non-empty list of token ids"}}
        if max(ids) >= self.model.config.vocab_size:
            return 400, {"error": {"message": f"token id {max(ids)} out of vocabulary"}}
        with self._lock:
            self.requests += 1
            if self.fail_next:
                self.fail_next -= 1
                return 503, {"error": {"message": "server overloaded"}}
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        log_p = torch.log_softmax(logits, -1)  # (L, V): row u predicts token u + 1
        meta = {"id": "0", "prompt_tokens": len(ids), "completion_tokens": 1, "finish_reason": {"type": "length"}}
        next_token = int(log_p[-1].argmax())
        if body.get("return_logprob"):
            start = int(body.get("logprob_start_len", -1))
            k = int(body.get("top_logprobs_num", 0) or 0)
            own = [[None, ids[0], None]] + [[float(log_p[u, ids[u + 1]]), ids[u + 1], None]
                                            for u in range(len(ids) - 1)]
            tops = [None]
            for u in range(len(ids) - 1):
                values, tokens = torch.topk(log_p[u], k) if k else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
                tops.append([[float(v), int(t), None] for v, t in zip(values.tolist(), tokens.tolist())] or None)
            if start >= 0:
                meta["input_token_logprobs"], meta["input_top_logprobs"] = own[start:], tops[start:]
            meta["output_token_logprobs"] = [[float(log_p[-1, next_token]), next_token, None]]
            meta["output_top_logprobs"] = [None]
        return 200, {"text": self.tokenizer.decode([next_token]), "output_ids": [next_token], "meta_info": meta}

    def get(self, path: str) -> tuple[int, dict]:
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "sglang",
                                                     "root": self.root, "max_model_len": self.max_model_len}]}
        if path == "/get_model_info":
            return 200, {"model_path": self.root, "tokenizer_path": self.root, "is_generation": True}
        return 404, {"detail": "Not Found"}

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        if path == "/generate":
            return self.generate(body)
        if path == "/tokenize":
            tokens = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
            return 200, {"tokens": tokens["input_ids"], "count": len(tokens["input_ids"]),
                         "max_model_len": self.max_model_len}
        return 404, {"detail": "Not Found"}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 (http.server's name)
                self._send(*server.get(self.path))

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except json.JSONDecodeError:
                    return self._send(400, {"error": {"message": "the body is not JSON"}})
                self._send(*server.post(self.path, body))

            def log_message(self, *args):  # quiet
                pass

        return Handler
