"""Per-process script of tests/test_invariance.py: TAIDTrainer, DHOTrainer, PreferenceDistillTrainer (sigmoid and
kto_pair) and MoEMimicTrainer (aux_loss_coef 0, and 0.5 as ``moe_mimic_aux``) trained in several batch layouts,
each run's facts written as files.

    python tests/distributed/invariance_worker.py --mode single --methods taid,dho --runs 8x1,4x2
    (or through distributed.launcher.launch, 2 processes, --mode ddp --runs 4x1)

Every run of a method trains the same student from the same teacher on the same 8 rows (paired items for DHO), in
the Trainer's sequential order, with SGD, a constant learning rate and no clipping, so one optimizer step over the
8 rows is one computation whatever the layout (per-device batch x accumulation x processes). All the methods and
layouts of one invocation run one after the other in this process (the imports are paid once).

Files written under ``$LLMKD_TEST_OUT``, per run tag ``<method>_<mode>_<batch>x<accumulation>``, in the layout
``test_distributed.Run`` reads: ``<tag>.rank<r>.json`` (log history, micro-batch records, method state, world
size), ``<tag>.init.pt`` / ``<tag>.step1.pt`` / ``<tag>.final.pt`` (rank 0: the student's weights).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))  # zero_worker
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (utils.py, test_*_support)
from utils import make_tokenizer, tiny_llama  # noqa: E402
from zero_worker import OUT, Recording, Step1Snapshot, engine_facts, full_state, is_rank0, rows  # noqa: E402

from llmkd import (  # noqa: E402
    DHOConfig,
    DHOTrainer,
    MoEMimicConfig,
    MoEMimicTrainer,
    PreferenceDistillConfig,
    PreferenceDistillTrainer,
    TAIDConfig,
    TAIDTrainer,
    upcycle_to_moe,
)

METHODS = ("taid", "dho", "preference_sigmoid", "preference_kto_pair", "moe_mimic", "moe_mimic_aux")
STEPS = {"taid": 3}  # TAID: t moves after step 2 (step 1 only records the loss), so step 3 uses the synced t


class RecordingTAIDTrainer(Recording, TAIDTrainer):
    pass


class RecordingMoEMimicTrainer(Recording, MoEMimicTrainer):
    pass


def common(tag: str, batch: int, accumulation: int, steps: int, lr: float) -> dict:
    return dict(
        output_dir=str(OUT / f"{tag}.trainer"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=steps, optim="sgd", learning_rate=lr,
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, train_sampling_strategy="sequential",
        logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True, dataloader_num_workers=0,
        use_cpu=False,  # the backend comes from the launcher's patch (gloo / MULTI_CPU), as under a real launch
    )


def build(method: str, tag: str, batch: int, accumulation: int, snapshot):
    """The trainer of ``method`` and a function of it returning its method state (JSON-able)."""
    steps = STEPS.get(method, 1)
    if method == "dho":
        return build_dho(common(tag, batch, accumulation, steps, 0.5), snapshot)
    tokenizer = make_tokenizer()
    student = tiny_llama(len(tokenizer), hidden=32, layers=2, seed=1)
    if method == "taid":
        teacher = tiny_llama(len(tokenizer) + 7, hidden=48, layers=2, seed=2)  # a 7-row larger head, as zero_worker
        # a large alpha and a small beta: the adaptive update at step 2 (from the step's synchronised loss) takes t
        # above the linear floor (0.8 at step 2 of 3), so step 3's loss depends on it
        args = TAIDConfig(**common(tag, batch, accumulation, steps, 1.0), loss_chunk_size=7, t_start=0.4,
                          alpha=1.5, beta=0.5, kd_ratio=0.8)
        trainer = RecordingTAIDTrainer(model=student, teacher_model=teacher, args=args,
                                       train_dataset=Dataset.from_list(rows()), processing_class=tokenizer,
                                       callbacks=[snapshot])
        trainer.micro = []
        # the exact (J, step, max_steps) each update receives: the test replays the schedule on them
        inputs, update = [], trainer.schedule.update

        def recording_update(loss, step, max_steps):
            inputs.append([float(loss), int(step), int(max_steps)])
            return update(loss, step, max_steps)

        trainer.schedule.update = recording_update
        return trainer, lambda t: dict(t.schedule.state_dict(), inputs=inputs)
    if method in ("moe_mimic", "moe_mimic_aux"):
        teacher = tiny_llama(len(tokenizer) + 7, hidden=48, layers=2, seed=2)
        student = upcycle_to_moe(student, num_experts=4, top_k=2, every=1, seed=3)
        # moe_mimic: no load-balancing loss (it is per micro-batch by design); moe_mimic_aux: a large one
        args = MoEMimicConfig(**common(tag, batch, accumulation, steps, 5.0), loss_chunk_size=7, moe_stage="d2s",
                              aux_loss_coef=0.5 if method == "moe_mimic_aux" else 0.0)
        trainer = RecordingMoEMimicTrainer(model=student, teacher_model=teacher, args=args,
                                           train_dataset=Dataset.from_list(rows()), processing_class=tokenizer,
                                           callbacks=[snapshot])
        trainer.micro = []
        gaps = record_top_k_gaps(student, k=2)
        return trainer, lambda t: {"min_router_gap": min(gaps)}
    if method.startswith("preference_"):
        from test_preference_trainer import preference_rows

        # the reference scores the student's ids; its larger initializer_range gives it more peaked, random
        # next-token distributions, so the student's responses are likelier under the student than under the
        # teacher (pi - ref > 0): kto_pair's KL estimates are then above their clamp at 0 and couple the pairs
        teacher = tiny_llama(len(tokenizer), hidden=48, layers=2, seed=2, initializer_range=0.2)
        loss_type = method[len("preference_"):]
        args = PreferenceDistillConfig(**common(tag, batch, accumulation, steps, 2.0), beta=0.5,
                                       loss_type=[loss_type])
        trainer = PreferenceDistillTrainer(model=student, teacher_model=teacher, args=args,
                                           train_dataset=Dataset.from_list(preference_rows(8, 11)),
                                           processing_class=tokenizer, callbacks=[snapshot])
        return trainer, lambda t: {}
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def record_top_k_gaps(model, k: int) -> list[float]:
    """Hooks on every router of ``model``: each forward appends the smallest gap between the k-th and (k+1)-th
    largest router logit over its tokens (the margin by which the top-k expert choice is decided)."""
    from llmkd.models.routing import find_routers

    gaps = []

    def hook(module, args, output):
        logits = output[0] if isinstance(output, (tuple, list)) else output
        ranked = logits.detach().reshape(-1, logits.shape[-1]).sort(dim=-1, descending=True).values
        gaps.append((ranked[:, k - 1] - ranked[:, k]).min().item())

    for _, router in find_routers(model):
        router.register_forward_hook(hook)
    return gaps


def build_dho(args: dict, snapshot):
    from test_dho_support import (
        clip_processor,
        image_dataset,
        student_processor,
        tiny_student,
        tiny_vit_config,
        zero_shot_teacher,
    )

    teacher = zero_shot_teacher()
    # a ViT student: LayerNorm only, no BatchNorm statistic couples the examples of a micro-batch (a ResNet
    # student's BatchNorm makes DHO depend on the micro-batch by design, as in the official code)
    config = DHOConfig(**args, labeled="25%", eval_strategy="no", search_inference_weights=False)
    trainer = DHOTrainer(model=tiny_student(tiny_vit_config(), seed=2), teacher_model=teacher, args=config,
                         train_dataset=image_dataset(32, seed=0), processing_class=student_processor(),
                         teacher_processing_class=clip_processor(), callbacks=[snapshot])
    return trainer, lambda t: {}


def train(method: str, mode: str, batch: int, accumulation: int) -> None:
    tag = f"{method}_{mode}_{batch}x{accumulation}"
    snapshot = Step1Snapshot(tag)
    trainer, method_state = build(method, tag, batch, accumulation, snapshot)
    snapshot.trainer = trainer
    from llmkd.heads import unwrap_model

    init = {name: p.detach().clone() for name, p in unwrap_model(trainer.model).named_parameters()}
    trainer.train()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    facts = {
        "rank": rank,
        "world_size": int(trainer.accelerator.num_processes),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "student_engine": engine_facts(trainer.model_wrapped),
        "micro": getattr(trainer, "micro", None) or [],
        "log_history": trainer.state.log_history,
        "method_state": method_state(trainer),
    }
    (OUT / f"{tag}.rank{rank}.json").write_text(json.dumps(facts, indent=1, default=str))
    final = full_state(trainer.model_wrapped)
    if is_rank0():
        torch.save(init, OUT / f"{tag}.init.pt")
        torch.save(final, OUT / f"{tag}.final.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "ddp"], required=True)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--runs", default="8x1,4x2", help="comma-separated BATCHxACCUMULATION layouts")
    options = parser.parse_args()
    torch.set_num_threads(1)
    for method in options.methods.split(","):
        for layout in options.runs.split(","):
            batch, accumulation = (int(x) for x in layout.split("x"))
            train(method, options.mode, batch, accumulation)


if __name__ == "__main__":
    main()
