"""The offline teacher: a sharded, resumable top-k teacher-logit cache (writer and reader).

Run the teacher once (``llmkd cache-teacher --config RECIPE.yaml``, or :func:`write_teacher_cache`), then train any
number of students from its outputs (``teacher_cache: PATH`` in a recipe) without the teacher in memory.

Per valid token of each prepared row (the positions ``j`` with ``labels[j + 1] != -100``) the cache holds the
top-k ids of ``log_softmax(z[:V] / T)``, their log-probabilities and ``log`` of the remaining mass, in Arrow IPC
shards (``datasets``-readable) with a ``metadata.json`` (teacher, fingerprints of the tokenizer and the dataset,
k, temperature, encoding, per-shard sha256). The encoding (Elias-Fano ids, 8-bit companded log-probabilities,
float16 tail) takes 154 bytes per token at k = 64 for a 32k vocabulary. See docs/CACHE.md.

Modules: :mod:`.topk` (what is cached), :mod:`.encoding` (how a token is stored: :mod:`.elias_fano`,
:mod:`.logprob_code`, :mod:`.bits`), :mod:`.shard` (the Arrow files), :mod:`.files` (names and atomic writes),
:mod:`.metadata`, :mod:`.fingerprint`, :mod:`.teacher_pass` (running the teacher), :mod:`.writer`,
:mod:`.reader`, :mod:`.command` (the CLI).
"""

from .encoding import TokenEncoding
from .errors import CacheCorruptError, CacheError, CacheMismatchError
from .fingerprint import dataset_fingerprint, tokenizer_fingerprint
from .reader import TeacherCache
from .topk import teacher_topk
from .writer import write_teacher_cache

__all__ = [
    "CacheCorruptError", "CacheError", "CacheMismatchError", "TeacherCache", "TokenEncoding", "dataset_fingerprint",
    "teacher_topk", "tokenizer_fingerprint", "write_teacher_cache",
]
