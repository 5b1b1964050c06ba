"""How far the losses on a top-k teacher cache are from the full-vocabulary losses, at k = 8, 32, 64.

    python scripts/bench_cache_error.py                 # ~20 s on a CPU

Tiny Llama teacher (2 x 64) and student (2 x 32) built from configs with a 32000-token vocabulary (Llama-2's size)
run on random token sequences; the teacher's head is scaled so that its mean per-token entropy is about
``--teacher_entropy`` nats (2.5 by default: a confident LM; a fresh head would be almost uniform, which no cache
serves well). For each loss the script compares, over the same tokens, the loss computed from the top-k cache
targets (:class:`llmkd.losses.SparseTeacher`, exactly what training from a cache computes) with the loss computed
from the teacher's full logits: the relative error of the value and the cosine between the two gradients with
respect to the student's logits. ``--student_mix`` moves the student towards the teacher (a fresh student puts
almost all its mass in the teacher's tail, the worst case for the tail approximations). It prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmkd.losses import SparseTeacher, get_divergence
from llmkd.losses.taid import TAIDTokenLoss

LOSSES = {
    "fkl": lambda: get_divergence("fkl"),
    "rkl": lambda: get_divergence("rkl"),
    "jsd beta=0.5": lambda: get_divergence("jsd", beta=0.5),
    "tvd": lambda: get_divergence("tvd"),
    "taid t=0.4": lambda: TAIDTokenLoss(0.4),
}


def tiny_llama(vocab: int, hidden: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def top_k(teacher_logits: torch.Tensor, k: int) -> SparseTeacher:
    log_p = torch.log_softmax(teacher_logits.float(), -1)
    values, ids = log_p.topk(k, dim=-1)
    tail = torch.logsumexp(log_p.scatter(1, ids, float("-inf")), -1)
    return SparseTeacher(ids, values, tail, teacher_logits.shape[-1])


def entropy(logits: torch.Tensor) -> float:
    log_p = torch.log_softmax(logits, -1)
    return float(-(log_p.exp() * log_p).sum(-1).mean())


def scale_to_entropy(logits: torch.Tensor, target: float) -> float:
    """The factor on the logits that gives a mean entropy of ``target`` nats (bisection on a log scale)."""
    low, high = 1e-2, 1e3
    for _ in range(60):
        mid = (low * high) ** 0.5
        low, high = (mid, high) if entropy(logits * mid) > target else (low, mid)
    return (low * high) ** 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=512, help="batch 4 x this/4 positions")
    parser.add_argument("--teacher_entropy", type=float, default=2.5)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--student_mix", type=float, default=0.0,
                        help="student logits = mix * teacher + (1 - mix) * fresh student: 0 is a fresh student, "
                        "0.7 one that has learned much of the teacher")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    teacher, student = tiny_llama(args.vocab, 64, seed=2), tiny_llama(args.vocab, 32, seed=1)
    ids = torch.randint(0, args.vocab, (4, args.tokens // 4 + 1))
    with torch.no_grad():
        teacher_logits = teacher(ids).logits[:, :-1].reshape(-1, args.vocab).float()
        student_logits = student(ids).logits[:, :-1].reshape(-1, args.vocab).float()
    factor = scale_to_entropy(teacher_logits, args.teacher_entropy)
    teacher_logits = teacher_logits * factor
    student_logits = args.student_mix * teacher_logits + (1 - args.student_mix) * student_logits
    print(f"teacher: mean entropy {entropy(teacher_logits):.2f} nats over {teacher_logits.shape[0]} tokens, "
          f"vocabulary {args.vocab}; student entropy {entropy(student_logits):.2f} nats")
    masses = {k: float(top_k(teacher_logits, k).log_probs.exp().sum(-1).mean()) for k in args.ks}
    print("mean teacher mass in the top-k: " + ", ".join(f"k={k}: {m:.3f}" for k, m in masses.items()))

    header = "| loss | " + " | ".join(f"k={k} value error | k={k} grad cosine" for k in args.ks) + " |"
    print("\n" + header + "\n" + "|---" * (1 + 2 * len(args.ks)) + "|")
    for name, make in LOSSES.items():
        loss = make()
        z = student_logits.clone().requires_grad_(True)
        full = loss(z, teacher_logits).sum()
        (full_grad,) = torch.autograd.grad(full, z)
        cells = []
        for k in args.ks:
            z = student_logits.clone().requires_grad_(True)
            cached = loss(z, top_k(teacher_logits, k)).sum()
            (grad,) = torch.autograd.grad(cached, z)
            error = abs(cached.item() - full.item()) / abs(full.item())
            cosine = torch.nn.functional.cosine_similarity(grad.double().flatten(), full_grad.double().flatten(),
                                                           dim=0).item()
            cells += [f"{error:.2%}", f"{cosine:.4f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
