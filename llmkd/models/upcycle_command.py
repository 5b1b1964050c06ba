"""``llmkd upcycle --model PATH --output_dir DIR``: upcycle a dense model to an MoE on disk (before a ZeRO-3 run).

Under DeepSpeed ZeRO-3 the trainer loads the student already partitioned, so it cannot upcycle it; upcycle once
here (on CPU, the whole model in memory), then point the d2s recipe's ``model_name_or_path`` at the output.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmkd upcycle", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="The dense model (path or Hub name): Llama, Qwen2, Qwen3 "
                        "or a LLaVA-style VLM with one of them as its language model.")
    parser.add_argument("--output_dir", required=True, help="Where to save the MoE model and its tokenizer.")
    parser.add_argument("--num_experts", type=int, default=4)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--every", type=int, default=2, help="Layers 0, every, 2*every, ... become sparse.")
    parser.add_argument("--aux_loss_coef", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the router initialisation.")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto.")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)

    from ..loading import load_causal_lm, load_processing_class
    from .moe import upcycle_to_moe

    dense = load_causal_lm(args.model, role="dense", dtype=args.dtype, revision=args.revision,
                           trust_remote_code=args.trust_remote_code)
    moe = upcycle_to_moe(dense, num_experts=args.num_experts, top_k=args.top_k, every=args.every,
                         aux_loss_coef=args.aux_loss_coef, seed=args.seed)
    moe.save_pretrained(args.output_dir)
    try:
        processor = load_processing_class(args.model, role="dense", revision=args.revision,
                                          trust_remote_code=args.trust_remote_code)
    except Exception as error:  # noqa: BLE001 - the weights are saved; the tokenizer is a convenience
        logger.warning("Saved the MoE model but no tokenizer/processor (%s): copy it next to the model.", error)
    else:
        processor.save_pretrained(args.output_dir)
    print(f"upcycled {args.model} -> {args.output_dir} ({type(moe).__name__}, {args.num_experts} experts, "
          f"top-{args.top_k}, every {args.every} layers)")
    return 0
