"""The synthetic VLM task of the MoE hallucination study (scripts/moe_hallucination_study.py).

An image is 16 x 16 RGB: a 4 x 4 grid of 4 x 4 cells (one cell per ViT patch) on a noisy dark background, with 1-3
distinct objects in distinct cells. An object is a colour (red, green, blue, yellow) and a shape drawn in 3 x 3
pixels at a jittered offset inside its cell: ``square`` (the full 3 x 3), ``cross`` (a plus) or ``bar`` (the
vertical arm of the cross alone), so 12 object kinds, some of them easy to confuse (a noisy cross looks like a bar).

Two questions with checkable answers, and a well-defined hallucination:

- ``list``: "what objects ? <image> answer" -> the present objects in a canonical order, e.g. "blue cross red square".
  Hallucination: the answer names an object that is absent.
- ``yesno``: "is there a red square ? <image> answer" -> "yes" / "no"; half of the asked objects are present, and
  half of the absent ones share a colour or a shape with a present one. Hallucination: "yes" for an absent object.

Everything is generated from a seed (``make_split``), tokenised by a word-level tokenizer over the task's words
(``make_tokenizer``), and turned into pixels by a LlavaProcessor sized to the images (``make_processor``), so that
the pre-tokenised mimic rows (``mimic_rows``) and TRL's vision preference collator (``preference_rows``) see
the same tokens and pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.15, 0.2, 0.95), "yellow": (0.85, 0.85, 0.1)}
SHAPES = {
    "square": [(r, c) for r in range(3) for c in range(3)],
    "cross": [(1, 0), (1, 1), (1, 2), (0, 1), (2, 1)],
    "bar": [(0, 1), (1, 1), (2, 1)],
}
OBJECTS = [(color, shape) for color in COLORS for shape in SHAPES]  # the canonical order of answers
IMAGE_SIZE, PATCH = 16, 4
GRID = IMAGE_SIZE // PATCH
IMAGE_TOKENS = GRID * GRID  # the "default" strategy drops CLS: one token per cell
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
WORDS = list(COLORS) + list(SHAPES) + "what objects is there a ? yes no answer".split()
LIST_PROMPT = "what objects ? <image> answer"


def object_name(obj: tuple[str, str]) -> str:
    return f"{obj[0]} {obj[1]}"


@dataclass
class Example:
    """One image with its objects and one question about it."""

    image: Image.Image
    objects: tuple  # the present (colour, shape) pairs, in canonical order
    kind: str  # "list" or "yesno"
    asked: tuple | None  # the object a yes/no question asks about
    prompt: str
    answer: str  # the correct answer, without eos
    cells: tuple = ()  # the object index (1 + position in OBJECTS) in each of the 16 cells, 0 when empty

    @property
    def asked_absent(self) -> bool:
        return self.kind == "yesno" and self.asked not in self.objects


def draw(objects: list, rng: random.Random, noise: float) -> tuple[Image.Image, tuple]:
    """An image holding ``objects`` in distinct random cells, with Gaussian pixel noise of std ``noise``, and the
    object index of each cell (0: empty)."""
    np_rng = np.random.default_rng(rng.randrange(2 ** 32))
    pixels = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 0.12) + np_rng.normal(0.0, noise, (IMAGE_SIZE, IMAGE_SIZE, 3))
    cells = rng.sample(range(GRID * GRID), len(objects))
    content = [0] * (GRID * GRID)
    for (color, shape), cell in zip(objects, cells):
        top, left = (cell // GRID) * PATCH + rng.randint(0, 1), (cell % GRID) * PATCH + rng.randint(0, 1)
        value = np.array(COLORS[color]) * rng.uniform(0.8, 1.1)
        content[cell] = 1 + OBJECTS.index((color, shape))
        for r, c in SHAPES[shape]:
            pixels[top + r, left + c] = value + np_rng.normal(0.0, noise, 3)
    return Image.fromarray((np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8)), tuple(content)


def canonical(objects) -> tuple:
    return tuple(sorted(objects, key=OBJECTS.index))


def list_answer(objects) -> str:
    return " ".join(object_name(o) for o in canonical(objects))


def absent_object(objects, rng: random.Random, confusable: bool) -> tuple[str, str]:
    """An absent object; ``confusable``: one sharing a colour or a shape with a present object (when one exists)."""
    absent = [o for o in OBJECTS if o not in objects]
    near = [o for o in absent if any(o[0] == p[0] or o[1] == p[1] for p in objects)]
    return rng.choice(near if confusable and near else absent)


def make_split(n_images: int, seed: int, noise: float = 0.08) -> list[Example]:
    """``n_images`` images, each with one list question and one yes/no question (2 * n_images examples)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n_images):
        objects = canonical(rng.sample(OBJECTS, rng.randint(1, 3)))
        image, cells = draw(list(objects), rng, noise)
        examples.append(Example(image, objects, "list", None, LIST_PROMPT, list_answer(objects), cells))
        if rng.random() < 0.5:
            asked, answer = rng.choice(objects), "yes"
        else:
            asked, answer = absent_object(objects, rng, confusable=rng.random() < 0.5), "no"
        prompt = f"is there a {object_name(asked)} ? <image> answer"
        examples.append(Example(image, objects, "yesno", asked, prompt, answer, cells))
    return examples


def hallucinated_answer(example: Example, rng: random.Random) -> str:
    """A wrong answer that names an absent object: a list with one absent object added (or, half of the time when
    there are several objects, swapped in for a present one); "yes" for an absent object."""
    if example.kind == "yesno":
        if not example.asked_absent:
            raise ValueError("A yes/no question about a present object has no hallucinated answer.")
        return "yes"
    extra = absent_object(example.objects, rng, confusable=rng.random() < 0.5)
    objects = list(example.objects)
    if len(objects) > 1 and rng.random() < 0.5:
        objects.remove(rng.choice(objects))
    return list_answer(objects + [extra])


def noisy_answer(example: Example, rng: random.Random, noise: float) -> str:
    """The students' 'general data' label: with probability ``noise`` a hallucinated answer (as web captions
    name things that are not there), else the correct one. Yes/no questions about present objects stay right."""
    if rng.random() < noise and (example.kind == "list" or example.asked_absent):
        return hallucinated_answer(example, rng)
    return example.answer


# ------------------------------------------------------------------------------------------ tokenizer / models
def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the task's words; ``<image>`` is a special token the processor expands."""
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def make_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                         image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=IMAGE_SIZE, patch_size=PATCH)


def tiny_llava(tokenizer, hidden: int, layers: int, seed: int, vision_from=None) -> LlavaForConditionalGeneration:
    """A LLaVA of a CLIP tower (16 patches) and a Llama text model of ``layers`` x ``hidden``; ``vision_from``: a
    LLaVA whose (trained) vision tower is copied in, as LLaVA-MoD's students share the teacher's vision encoder."""
    torch.manual_seed(seed)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision_config(), text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    if vision_from is not None:
        is_llava = isinstance(vision_from, LlavaForConditionalGeneration)
        tower = vision_from.model.vision_tower if is_llava else vision_from
        model.model.vision_tower.load_state_dict(tower.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def cell_labels(example: Example) -> torch.Tensor:
    """``(16,)`` the object index (1 + position in OBJECTS) drawn in each cell, 0 for an empty cell."""
    return torch.tensor(example.cells)


def pretrain_vision_tower(processor, examples: list[Example], steps: int, lr: float, seed: int,
                          batch_size: int = 64):
    """A CLIP tower trained to name the object of each cell from its patch token (16 x 13-way classification): a
    stand-in for the pretrained vision encoder every LLaVA starts from. Returns (tower, held-in cell accuracy)."""
    from transformers import CLIPVisionModel

    torch.manual_seed(seed)
    tower = CLIPVisionModel(vision_config())
    head = torch.nn.Linear(tower.config.hidden_size, len(OBJECTS) + 1)
    pixels = torch.stack([p for _, p in encode(processor, examples)])
    labels = torch.stack([cell_labels(e) for e in examples])
    parameters = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    correct = total = 0
    for step in range(steps):
        index = torch.randint(len(examples), (batch_size,), generator=generator)
        hidden = tower(pixel_values=pixels[index]).last_hidden_state[:, 1:]  # (B, 16, d): the patch tokens
        logits = head(hidden)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[index].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step >= steps - 20:
            correct += (logits.argmax(-1) == labels[index]).sum().item()
            total += labels[index].numel()
    return tower.eval(), correct / max(total, 1)


# ------------------------------------------------------------------------------------------------- rows
def encode(processor, examples: list[Example], batch_size: int = 512) -> list[tuple[list[int], torch.Tensor]]:
    """``(prompt token ids, pixel_values (3, 16, 16))`` per example, as the processor makes them (the prompt's
    ``<image>`` expanded to one token per patch, no special tokens added); prompts are tokenised once each."""
    prompt_ids: dict[str, list[int]] = {}
    for example in examples:
        if example.prompt not in prompt_ids:
            batch = processor(images=[example.image], text=[example.prompt], add_special_tokens=False)
            prompt_ids[example.prompt] = list(batch["input_ids"][0])
    pixels = []
    for start in range(0, len(examples), batch_size):
        images = [e.image for e in examples[start:start + batch_size]]
        pixels.extend(processor.image_processor(images=images, return_tensors="pt")["pixel_values"])
    return [(prompt_ids[e.prompt], p) for e, p in zip(examples, pixels)]


def mimic_rows(processor, examples: list[Example], answers: list[str] | None = None) -> list[dict]:
    """Pre-tokenised rows (``input_ids``, ``labels`` -100 on the prompt, ``pixel_values`` (3, 16, 16)), tokenised as
    TRL's vision preference collator does (prompt then answer + eos, no special tokens added)."""
    rows = []
    answers = answers if answers is not None else [e.answer for e in examples]
    for (prompt, pixels), answer in zip(encode(processor, examples), answers):
        completion = processor.tokenizer(f" {answer} </s>", add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion,
                     "pixel_values": pixels.tolist()})
    return rows


def preference_rows(examples: list[Example], seed: int) -> list[dict]:
    """Preference pairs (``images``, ``prompt``, ``chosen`` correct, ``rejected`` hallucinated) for every example
    that admits a hallucination: all list questions and the yes/no questions about absent objects."""
    rng = random.Random(seed)
    rows = []
    for example in examples:
        if example.kind == "yesno" and not example.asked_absent:
            continue
        rows.append({"images": [example.image], "prompt": example.prompt, "chosen": f" {example.answer} </s>",
                     "rejected": f" {hallucinated_answer(example, rng)} </s>"})
    return rows


# ------------------------------------------------------------------------------------------------- scoring
def named_objects(text: str) -> list[tuple[str, str]]:
    words = text.split()
    return [(a, b) for a, b in zip(words, words[1:]) if a in COLORS and b in SHAPES]


def score(example: Example, prediction: str) -> tuple[bool, bool]:
    """(exact match, hallucination) of a generated answer (special tokens removed)."""
    prediction = " ".join(prediction.split())
    correct = prediction == example.answer
    if example.kind == "list":
        hallucinated = any(o not in example.objects for o in named_objects(prediction))
    else:
        hallucinated = example.asked_absent and prediction.split()[:1] == ["yes"]
    return correct, hallucinated


@torch.no_grad()
def generate_answers(model, processor, examples: list[Example], batch_size: int = 128,
                     max_new_tokens: int = 8) -> list[str]:
    """Greedy answers; prompts are grouped by token length so that no batch needs padding."""
    model.eval()
    tokenizer = processor.tokenizer
    answers: list[str | None] = [None] * len(examples)
    rows = encode(processor, examples)
    by_length: dict[int, list[int]] = {}
    for i, (ids, _) in enumerate(rows):
        by_length.setdefault(len(ids), []).append(i)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            input_ids = torch.tensor([rows[i][0] for i in chunk])
            pixel_values = torch.stack([rows[i][1] for i in chunk])
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    pixel_values=pixel_values, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            for i, sequence in zip(chunk, output[:, input_ids.shape[1]:]):
                answers[i] = tokenizer.decode(sequence, skip_special_tokens=True)
    return answers


@torch.no_grad()
def yes_no_auc(model, processor, examples: list[Example], batch_size: int = 256) -> float:
    """How well the model's ``logit(yes) - logit(no)`` at the answer position separates the yes/no questions about
    present objects from those about absent ones (ROC AUC; 0.5: no better than chance). Unlike the yes rates it
    does not depend on where the model puts its threshold, so it tells a better discrimination apart from a mere
    shift towards "no"."""
    model.eval()
    tokenizer = processor.tokenizer
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    questions = [e for e in examples if e.kind == "yesno"]
    scores = []
    for start in range(0, len(questions), batch_size):  # yes/no prompts all have the same length
        rows = encode(processor, questions[start:start + batch_size])
        input_ids = torch.tensor([ids for ids, _ in rows])
        logits = model(input_ids=input_ids, pixel_values=torch.stack([p for _, p in rows])).logits[:, -1]
        scores.extend((logits[:, yes] - logits[:, no]).tolist())
    present = [s for s, e in zip(scores, questions) if not e.asked_absent]
    absent = [s for s, e in zip(scores, questions) if e.asked_absent]
    wins = sum((p > a) + 0.5 * (p == a) for p in present for a in absent)
    return float(wins / max(len(present) * len(absent), 1))


def evaluate(model, processor, examples: list[Example]) -> dict[str, float]:
    """Accuracy and hallucination rate over all questions, and per question kind.

    - ``accuracy``: exact match; ``hallucination``: share of answers naming an absent object or saying yes to one;
    - ``list_accuracy`` / ``list_hallucination``: over the list questions (CHAIR-like);
    - ``yes_on_absent``: share of yes/no questions about an absent object answered yes (POPE-like false-yes rate);
    - ``yes_on_present``: share of yes/no questions about a present object answered yes (recall; a model that
      learned to say no to everything has no hallucination and no recall);
    - ``yesno_auc``: :func:`yes_no_auc`, the threshold-free separation of present from absent objects.
    """
    predictions = generate_answers(model, processor, examples)
    scored = [score(e, p) for e, p in zip(examples, predictions)]

    def mean(values):
        values = list(values)
        return float(sum(values) / max(len(values), 1))

    kinds = [e.kind for e in examples]
    return {
        "accuracy": mean(c for c, _ in scored),
        "hallucination": mean(h for _, h in scored),
        "list_accuracy": mean(c for (c, _), k in zip(scored, kinds) if k == "list"),
        "list_hallucination": mean(h for (_, h), k in zip(scored, kinds) if k == "list"),
        "yesno_accuracy": mean(c for (c, _), k in zip(scored, kinds) if k == "yesno"),
        "yes_on_absent": mean(p.split()[:1] == ["yes"] for e, p in zip(examples, predictions) if e.asked_absent),
        "yes_on_present": mean(p.split()[:1] == ["yes"] for e, p in zip(examples, predictions)
                               if e.kind == "yesno" and not e.asked_absent),
        "yesno_auc": yes_no_auc(model, processor, examples),
    }
