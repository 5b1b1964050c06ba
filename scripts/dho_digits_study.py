"""DHO vs the single-head CE+KD baseline vs CE only, on scikit-learn's 8x8 handwritten digits, with 1% and 10% of the
train labels, over several seeds (the study of docs/DHO.md).

Teacher: the tiny CLIP of ``recipes/assets/dho-tiny/teacher`` (``scripts/make_dho_tiny_assets.py``: trained
contrastively on a split no student sees), used zero-shot with prompts it was not trained on; its logits are
computed once for the 900 train images. Student: a freshly initialised tiny ResNet (about 30k parameters; the
teacher's vision tower has about 100k) with two heads, trained with :class:`llmkd.DHOTrainer`:

* ``CE only``: ``ce_weight=1`` (single head; the unlabeled images carry no signal);
* ``CE+KD (1 head)``: ``single_head=True``: one head trained on ``lam CE + (1 - lam) T^2 (KL_l + KL_u)``;
* ``DHO``: two heads, the same loss split between them, ``alpha``/``beta`` searched on validation.

Two protocols: ``val``: evaluation on the validation split (150 labeled images) after every epoch, the best epoch's
checkpoint kept (for every method) and DHO's alpha/beta searched there; ``no-val``: no validation at all, the last
epoch's model, DHO with the paper's no-validation rule (alpha 0.4, beta 0.5). The TEST split (347 images) is used
for nothing but the final numbers. Every method gets the same optimizer, schedule, steps and seeds; the seed sets
the labeled subset and the initialisation.

    python scripts/dho_digits_study.py                       # 5 seeds, about 10 minutes on one CPU thread
    python scripts/dho_digits_study.py --seeds 0 1 2 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import datasets
import numpy as np
import torch
from transformers import PrinterCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_dho_tiny_assets import ASSETS, ZERO_SHOT_TEMPLATES  # noqa: E402

from llmkd import DHOConfig, DHOTrainer, DualHeadConfig, DualHeadModel  # noqa: E402
from llmkd.data.images import ImageTransform, compute_teacher_logits  # noqa: E402
from llmkd.models.clip_teacher import CLIPZeroShotClassifier  # noqa: E402
from llmkd.models.dual_head import DEFAULT_ALPHA, DEFAULT_BETA, combine_head_predictions  # noqa: E402

METHODS = {
    "CE only": dict(ce_weight=1.0, single_head=True),
    "CE+KD (1 head)": dict(ce_weight=0.5, single_head=True),
    "DHO": dict(ce_weight=0.5, single_head=False),
}


def load_assets(assets: str):
    from transformers import AutoConfig, AutoImageProcessor

    splits = datasets.load_from_disk(os.path.join(assets, "digits"))
    class_names = splits["train"].features["label"].names
    teacher = CLIPZeroShotClassifier.from_pretrained(os.path.join(assets, "teacher"), class_names,
                                                     ZERO_SHOT_TEMPLATES, dtype=torch.float32)
    teacher_processor = AutoImageProcessor.from_pretrained(os.path.join(assets, "teacher"))
    student_processor = AutoImageProcessor.from_pretrained(os.path.join(assets, "student"))
    student_config = AutoConfig.from_pretrained(os.path.join(assets, "student"))
    return splits, class_names, teacher, teacher_processor, student_processor, student_config


def with_pixels(dataset, processor):
    """Process the images once (the study trains 30+ students on the same pixels)."""
    pixels = ImageTransform(processor)(dataset[:])["pixel_values"].numpy()
    return dataset.add_column("pixel_values", pixels.tolist()).remove_columns("image")


def run(method: str, labeled: str, seed: int, protocol: str, data, args) -> dict:
    train, validation, test, class_names, processor, backbone_config = data
    id2label = dict(enumerate(class_names))
    torch.manual_seed(seed)
    student = DualHeadModel(DualHeadConfig(backbone_config=backbone_config, id2label=id2label,
                                           label2id={v: k for k, v in id2label.items()}))
    with tempfile.TemporaryDirectory() as output_dir:
        use_val = protocol == "val"
        config = DHOConfig(
            output_dir=output_dir, labeled=labeled, seed=seed, data_seed=seed, **METHODS[method],
            temperature=2.0, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=256,
            num_train_epochs=args.epochs, learning_rate=args.learning_rate, weight_decay=0.01,
            lr_scheduler_type="cosine", warmup_steps=0.05, eval_strategy="epoch" if use_val else "no",
            save_strategy="epoch" if use_val else "no", save_total_limit=1, load_best_model_at_end=use_val,
            logging_steps=1000, use_cpu=True, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = DHOTrainer(model=student, args=config, train_dataset=train,
                             eval_dataset=validation if use_val else None, processing_class=processor)
        trainer.remove_callback(PrinterCallback)  # one line per run below instead
        trainer.train()
        model = trainer.model.eval()
        if not use_val and method == "DHO":
            model.set_inference_weights(DEFAULT_ALPHA, DEFAULT_BETA)
        metrics = trainer.evaluate(test, metric_key_prefix="test")  # the stored alpha/beta, no search
    pixels = torch.as_tensor(np.asarray(test["pixel_values"]), dtype=torch.float32)
    with torch.no_grad():
        out = model(pixel_values=pixels)
    labels = torch.tensor(test["label"])
    check = (combine_head_predictions(out.ce_logits, out.kd_logits, model.config.alpha, model.config.beta)
             .argmax(-1) == labels).double().mean().item()
    assert abs(check - metrics["test_accuracy"]) < 1e-9, (check, metrics["test_accuracy"])
    return {"method": method, "labeled": labeled, "seed": seed, "protocol": protocol,
            "test_accuracy": metrics["test_accuracy"], "ce_head": metrics["test_ce_head_accuracy"],
            "kd_head": metrics.get("test_kd_head_accuracy"), "alpha": model.config.alpha,
            "beta": model.config.beta, "labeled_rows": len(trainer.labeled_dataset)}


def summary(results: list[dict], teacher_test: float) -> str:
    def cell(values):
        values = [100 * v for v in values]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.1f} ± {spread:.1f}"

    seeds = sorted({r["seed"] for r in results})
    lines = [f"Test accuracy (%), mean ± sample std over seeds {seeds}; teacher (zero-shot CLIP): "
             f"{100 * teacher_test:.1f}.", "",
             "| protocol | labels | method | test acc. | CE head | KD head | alpha / beta chosen |",
             "|---|---|---|---|---|---|---|"]
    for protocol in ("val", "no-val"):
        for labeled in dict.fromkeys(r["labeled"] for r in results):
            for method in METHODS:
                rows = [r for r in results if (r["protocol"], r["labeled"], r["method"]) == (protocol, labeled,
                                                                                               method)]
                if not rows:
                    continue
                kd = cell([r["kd_head"] for r in rows]) if method == "DHO" else "-"
                weights = ", ".join(f"{r['alpha']:g}/{r['beta']:g}" for r in rows) if method == "DHO" else "-"
                lines.append(f"| {protocol} | {labeled} ({rows[0]['labeled_rows']} rows) | {method} | "
                             f"{cell([r['test_accuracy'] for r in rows])} | {cell([r['ce_head'] for r in rows])} "
                             f"| {kd} | {weights} |")
    wins = []
    for protocol in ("val", "no-val"):
        for labeled in dict.fromkeys(r["labeled"] for r in results):
            pairs = [(d["test_accuracy"], s["test_accuracy"]) for d in results for s in results
                     if d["method"] == "DHO" and s["method"] == "CE+KD (1 head)" and d["seed"] == s["seed"]
                     and (d["protocol"], d["labeled"]) == (s["protocol"], s["labeled"]) == (protocol, labeled)]
            if pairs:
                better = sum(d > s for d, s in pairs)
                ties = sum(d == s for d, s in pairs)
                wins.append(f"{protocol}, {labeled}: DHO > CE+KD on {better}/{len(pairs)} seeds ({ties} ties)")
    return "\n".join(lines + ["", "Per seed: " + "; ".join(wins) + "."])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="DHO vs CE+KD vs CE on 8x8 digits (docs/DHO.md).")
    parser.add_argument("--assets", default=ASSETS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--labels", nargs="+", default=["1%", "10%"])
    parser.add_argument("--protocols", nargs="+", default=["val", "no-val"], choices=["val", "no-val"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--results_json", default=None, help="Also write every run's numbers here.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    import transformers

    transformers.logging.set_verbosity_error()
    start = time.time()

    splits, class_names, teacher, teacher_processor, processor, backbone_config = load_assets(args.assets)
    train = splits["train"].add_column(
        "teacher_logits", list(compute_teacher_logits(teacher, splits["train"], teacher_processor)))
    teacher_acc = {}
    for name in ("validation", "test"):
        logits = compute_teacher_logits(teacher, splits[name], teacher_processor)
        teacher_acc[name] = float((logits.argmax(-1) == np.asarray(splits[name]["label"])).mean())
    print(f"teacher zero-shot accuracy: validation {teacher_acc['validation']:.3f}, test {teacher_acc['test']:.3f}")
    data = (with_pixels(train, processor), with_pixels(splits["validation"], processor),
            with_pixels(splits["test"], processor), class_names, processor, backbone_config)

    results = []
    for protocol in args.protocols:
        for labeled in args.labels:
            for seed in args.seeds:
                for method in METHODS:
                    result = run(method, labeled, seed, protocol, data, args)
                    results.append(result)
                    print(f"[{time.time() - start:6.0f}s] {protocol:6s} {labeled:>4s} seed {seed} {method:15s} "
                          f"test {result['test_accuracy']:.3f} (alpha {result['alpha']:g}, beta {result['beta']:g})",
                          flush=True)
    print()
    print(summary(results, teacher_acc["test"]))
    print(f"\n{len(results)} runs in {time.time() - start:.0f} s")
    if args.results_json:
        with open(args.results_json, "w", encoding="utf-8") as handle:
            json.dump({"teacher": teacher_acc, "args": vars(args), "runs": results}, handle, indent=1)


if __name__ == "__main__":
    main()
