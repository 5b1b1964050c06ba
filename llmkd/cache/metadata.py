"""The cache's plan (what is cached, fixed before any shard is written) and its metadata (the plan plus the
shards' records), with their checks.

``metadata.json`` holds every plan field and ``num_tokens``, ``bytes``, ``bytes_per_token``, ``shards`` (per shard:
``file``, ``rows`` ``[start, stop)``, ``num_tokens``, ``bytes``, ``sha256``), ``created`` (the only field that
differs between two runs that cached the same thing) and ``metadata_checksum`` (sha256 of the file's content
without ``created`` and itself).
"""

from __future__ import annotations

import datetime

from .encoding import TokenEncoding
from .errors import CacheCorruptError
from .files import FORMAT, FORMAT_VERSION, json_bytes, sha256_bytes

#: plan fields that must agree for two runs to write into one folder, and for a cache to be read as such
PLAN_KEYS = ("format", "format_version", "teacher", "teacher_revision", "tokenizer_fingerprint", "tokenizer_size",
             "dataset_fingerprint", "num_rows", "k", "temperature", "vocab_size", "logprob_bits", "dtypes",
             "shard_rows", "num_shards")
UNCHECKSUMMED = ("created", "metadata_checksum")


def make_plan(*, teacher: str, teacher_revision: str | None, tokenizer_fingerprint: str, tokenizer_size: int,
              dataset_fingerprint: str, num_rows: int, encoding: TokenEncoding, temperature: float, shard_rows: int,
              num_shards: int, source: dict | None = None) -> dict:
    """The plan of a cache. ``source`` (e.g. the recipe's data fields) is recorded for people, never compared."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "teacher": teacher, "teacher_revision": teacher_revision,
        "tokenizer_fingerprint": tokenizer_fingerprint, "tokenizer_size": int(tokenizer_size),
        "dataset_fingerprint": dataset_fingerprint, "num_rows": int(num_rows), "k": encoding.k,
        "temperature": float(temperature), "vocab_size": encoding.vocab_size, "logprob_bits": encoding.logprob_bits,
        "dtypes": encoding.describe(), "shard_rows": int(shard_rows), "num_shards": int(num_shards),
        "source": dict(source or {}),
    }


def plan_differences(found: dict, wanted: dict) -> list[str]:
    """``"key: <found> (folder) vs <wanted> (this run)"`` for each :data:`PLAN_KEYS` field that differs."""
    return [f"{key}: {found.get(key)!r} (folder) vs {wanted.get(key)!r} (this run)"
            for key in PLAN_KEYS if found.get(key) != wanted.get(key)]


def build_metadata(plan: dict, shard_records: list[dict], llmkd_version: str) -> dict:
    num_tokens = sum(r["num_tokens"] for r in shard_records)
    total_bytes = sum(r["bytes"] for r in shard_records)
    metadata = dict(plan)
    metadata.update(
        num_tokens=num_tokens, bytes=total_bytes,
        bytes_per_token=round(total_bytes / num_tokens, 3) if num_tokens else None,
        shards=shard_records, llmkd_version=llmkd_version,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    metadata["metadata_checksum"] = metadata_checksum(metadata)
    return metadata


def metadata_checksum(metadata: dict) -> str:
    return sha256_bytes(json_bytes({k: v for k, v in metadata.items() if k not in UNCHECKSUMMED}))


def check_metadata(metadata: dict, path) -> TokenEncoding:
    """Check a metadata dict read from ``path`` (format, version, fields, checksum); return its encoding."""
    if metadata.get("format") != FORMAT:
        raise CacheCorruptError(f"{path} is not llmkd teacher-cache metadata (format {metadata.get('format')!r}).")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CacheCorruptError(
            f"{path} has cache format version {metadata.get('format_version')}; this llmkd reads version "
            f"{FORMAT_VERSION}. Use the llmkd version that wrote it, or rewrite the cache.")
    missing = [k for k in PLAN_KEYS + ("num_tokens", "shards", "metadata_checksum") if k not in metadata]
    if missing:
        raise CacheCorruptError(f"{path} lacks the fields {missing}: the file is damaged. Rewrite the cache.")
    if metadata_checksum(metadata) != metadata["metadata_checksum"]:
        raise CacheCorruptError(f"{path} fails its checksum (edited or damaged): rewrite the cache, or rerun "
                                "llmkd cache-teacher with the same recipe to rebuild the metadata.")
    if len(metadata["shards"]) != metadata["num_shards"]:
        raise CacheCorruptError(f"{path} lists {len(metadata['shards'])} shards but num_shards is "
                                f"{metadata['num_shards']}.")
    return TokenEncoding(int(metadata["vocab_size"]), int(metadata["k"]), int(metadata["logprob_bits"]))
