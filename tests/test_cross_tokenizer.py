"""Cross-tokenizer alignment (llmkd/cross_tokenizer): spans of one text under two tokenizers, and the shared
vocabulary, on hand-written offsets and on tokenizers trained here (byte-level BPE and SentencePiece-style BPE)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmkd.cross_tokenizer import align_tokens
from llmkd.cross_tokenizer.vocabulary import shared_vocabulary, token_strings
from utils import corpus, make_tokenizer


def metaspace_tokenizer(vocab_size: int = 200, lowercase: bool = False, alphabet_from=None) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE tokenizer (spaces as ``▁``, kept in the token's offsets), trained here."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    tok.train_from_iterator(alphabet_from or corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="module")
def byte_level():
    return make_tokenizer(320)


@pytest.fixture(scope="module")
def metaspace():
    return metaspace_tokenizer(200)


def encode(tokenizer, text):
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    return encoded["input_ids"], encoded["offset_mapping"]


def naive_boundaries(offsets) -> set[int]:
    """The positions where a token ends and no token of the same side straddles (from the definition)."""
    tokens = [(s, e) for s, e in offsets if e > s]
    return {e for _, e in tokens if not any(s < e < end for s, end in tokens)}


def span_texts(text, offsets, spans, num_spans):
    """The text each span's tokens cover on one side (from the first token's start to the last one's end)."""
    out = []
    for span in range(num_spans):
        members = [offsets[i] for i in np.flatnonzero(spans == span)]
        out.append(text[min(s for s, _ in members):max(e for _, e in members)])
    return out


# --------------------------------------------------------------------------------------------- hand-written
def test_spans_are_the_shortest_common_boundaries():
    text = "hello world, again"
    student = [(0, 5), (5, 11), (11, 12), (12, 18)]  # hello| world|,| again (its space in the token)
    teacher = [(0, 3), (3, 5), (6, 11), (11, 14), (14, 18)]  # hel|lo|world (space trimmed)|, a|gain
    alignment = align_tokens(text, student, teacher)
    assert alignment.student_spans.tolist() == [0, 1, 2, 2]
    assert alignment.teacher_spans.tolist() == [0, 0, 1, 2, 2]
    assert alignment.num_spans == 3 and alignment.dropped_spans == 0
    student_count, teacher_count = alignment.tokens_per_span()
    assert student_count.tolist() == [1, 1, 2] and teacher_count.tolist() == [2, 1, 2]  # 1:2, 1:1, 2:2
    assert alignment.one_to_one().tolist() == [False, True, False]


def test_special_tokens_and_shared_characters():
    text = "ab é"
    # the student has a BOS (0, 0) and splits "é" into two byte-level pieces with the same offsets
    student = [(0, 0), (0, 2), (2, 4), (3, 4)]
    teacher = [(0, 1), (1, 2), (2, 4)]
    alignment = align_tokens(text, student, teacher)
    assert alignment.student_spans.tolist() == [-1, 0, 1, 1]
    assert alignment.teacher_spans.tolist() == [0, 0, 1]
    assert alignment.dropped_spans == 0


def test_a_span_the_sides_cover_differently_is_dropped_and_counted():
    text = "ab cd ef"
    # the teacher's tokenizer dropped "c" (say, a normalisation): its tokens cover one character less in span 1
    student = [(0, 2), (2, 5), (5, 8)]
    teacher = [(0, 2), (4, 5), (5, 8)]
    alignment = align_tokens(text, student, teacher)
    assert alignment.student_spans.tolist() == [0, -1, 1]
    assert alignment.teacher_spans.tolist() == [0, -1, 1]
    assert alignment.num_spans == 2 and alignment.dropped_spans == 1
    # an unknown token is no evidence of what it covers: the span is dropped
    unknown = align_tokens(text, student, [(0, 2), (2, 5), (5, 8)], teacher_ids=[7, 1, 9], teacher_unk_id=1)
    assert unknown.teacher_spans.tolist() == [0, -1, 1] and unknown.dropped_spans == 1


def test_offsets_that_end_before_they_start_are_refused():
    with pytest.raises(ValueError, match="ends before it starts"):
        align_tokens("abc", [(2, 1)], [(0, 3)])


# ---------------------------------------------------------------------------------------- real tokenizers
def test_trained_tokenizers_align_every_character(byte_level, metaspace):
    rng = random.Random(0)
    texts = corpus(50, seed=3) + ["what is the sum of one and  two   then three", " the cat "]
    rng.shuffle(texts)
    for text in texts:
        student_ids, student_offsets = encode(byte_level, text)
        teacher_ids, teacher_offsets = encode(metaspace, text)
        alignment = align_tokens(text, student_offsets, teacher_offsets, student_ids=student_ids,
                                 teacher_ids=teacher_ids, student_unk_id=byte_level.unk_token_id,
                                 teacher_unk_id=metaspace.unk_token_id)
        assert alignment.dropped_spans == 0, text
        assert (alignment.student_spans >= 0).all() and (alignment.teacher_spans >= 0).all(), text
        # spans are in text order on both sides, and each holds the same text up to whitespace
        assert (np.diff(alignment.student_spans) >= 0).all() and (np.diff(alignment.teacher_spans) >= 0).all()
        student_text = span_texts(text, student_offsets, alignment.student_spans, alignment.num_spans)
        teacher_text = span_texts(text, teacher_offsets, alignment.teacher_spans, alignment.num_spans)
        assert [t.strip() for t in student_text] == [t.strip() for t in teacher_text], text
        assert "".join(t.strip() for t in student_text) == "".join(text.split())
        # the spans are the shortest: their ends are exactly the positions that are token boundaries on both sides
        ends = [max(student_offsets[i][1] for i in np.flatnonzero(alignment.student_spans == span))
                for span in range(alignment.num_spans)]
        assert ends == sorted(naive_boundaries(student_offsets) & naive_boundaries(teacher_offsets)), text


def test_characters_one_tokenizer_cannot_encode_are_dropped_not_misaligned(byte_level):
    teacher = metaspace_tokenizer(120, alphabet_from=["abc def"] * 20)  # knows a-f and space only
    text = "abc xyz def"
    student_ids, student_offsets = encode(byte_level, text)
    teacher_ids, teacher_offsets = encode(teacher, text)
    assert teacher.unk_token_id in teacher_ids
    alignment = align_tokens(text, student_offsets, teacher_offsets, student_ids=student_ids,
                             teacher_ids=teacher_ids, teacher_unk_id=teacher.unk_token_id)
    assert alignment.dropped_spans >= 1
    kept_teacher = [teacher_offsets[i] for i in np.flatnonzero(alignment.teacher_spans >= 0)]
    assert all("x" not in text[s:e] and "y" not in text[s:e] for s, e in kept_teacher)
    student_text = span_texts(text, student_offsets, alignment.student_spans, alignment.num_spans)
    assert [t.strip() for t in student_text] == ["abc", "", "def"]  # the space between abc and xyz is a span


def test_a_lowercasing_tokenizer_still_aligns_by_characters(byte_level):
    teacher = metaspace_tokenizer(200, lowercase=True)
    text = "The Cat sat on the Mat"
    student_ids, student_offsets = encode(byte_level, text)
    teacher_ids, teacher_offsets = encode(teacher, text)
    alignment = align_tokens(text, student_offsets, teacher_offsets)
    assert alignment.dropped_spans == 0 and (alignment.teacher_spans >= 0).all()


# --------------------------------------------------------------------------------------- shared vocabulary
def test_token_strings_turn_space_markers_into_spaces(byte_level, metaspace):
    for tokenizer in (byte_level, metaspace):
        strings = token_strings(tokenizer)
        assert len(strings) == len(tokenizer)
        assert all(strings[i] is None for i in tokenizer.all_special_ids)
        ids = tokenizer.encode(" the cat", add_special_tokens=False)
        assert "".join(strings[i] for i in ids).strip() == "the cat"
        assert any(s is not None and s.startswith(" ") and s.strip() for s in strings)  # a word with its space


def test_shared_vocabulary_pairs_tokens_of_the_same_string(byte_level, metaspace):
    student_ids, teacher_ids = shared_vocabulary(byte_level, metaspace)
    student_strings, teacher_strings = token_strings(byte_level), token_strings(metaspace)
    assert len(student_ids) == len(teacher_ids) > 20
    assert (np.diff(student_ids) > 0).all() and len(set(teacher_ids.tolist())) == len(teacher_ids)
    for s, t in zip(student_ids.tolist(), teacher_ids.tolist()):
        assert student_strings[s] == teacher_strings[t] is not None
    # every string both sides have is paired (the map is complete, not a sample)
    both = {x for x in student_strings if x} & {x for x in teacher_strings if x}
    assert len(both) == len(student_ids)
    assert " cat" in both and "a" in both
