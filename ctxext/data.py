"""Text data: where documents come from, tokenising, packing into fixed-length blocks, caching.

The default local long-text corpus is the Python standard library's own sources: it exists
on any machine with Python, so the demo and the tests never need a network.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".text")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
LOCAL_CORPUS = "stdlib"


class DataError(ValueError):
    """The data section cannot produce training data; the message says why and what to do."""


def local_text_files() -> list[Path]:
    """The Python standard library's ``.py`` files, sorted (deterministic across runs)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.glob("*.py") if p.is_file()]
    if not files:
        raise FileNotFoundError(f"no Python source files found under {root}; pass your own text files instead")
    return sorted(files)


def local_text(min_chars: int) -> str:
    """At least ``min_chars`` characters of local text (standard-library sources, concatenated)."""
    parts, total = [], 0
    for path in local_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= min_chars:
            break
    text = "\n\n".join(parts)
    if len(text) < min_chars:
        raise ValueError(f"the local corpus holds only {len(text)} characters, fewer than the {min_chars} requested")
    return text


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + RECORD_SUFFIXES)


def resolve_files(source: str) -> list[Path] | None:
    """Local files of a data source (None for a Hub data set name)."""
    if source == LOCAL_CORPUS:
        return local_text_files()
    paths = [Path(s.strip()).expanduser() for s in source.split(",") if s.strip()]
    if all(p.exists() for p in paths):
        files = [f for p in paths for f in _files_under(p)]
        if not files:
            raise DataError(
                f"data.source {source!r} holds no usable files (text: {', '.join(TEXT_SUFFIXES)}; "
                f"records: {', '.join(RECORD_SUFFIXES)})"
            )
        return files
    missing = [str(p) for p in paths if not p.exists()]
    looks_local = any(s.startswith((".", "/", "~")) or Path(s).suffix for s in source.split(","))
    if looks_local or len(paths) > 1:
        raise DataError(f"data.source: {', '.join(missing)} does not exist; pass existing files or directories")
    return None


def iter_documents(
    source: str,
    text_field: str = "text",
    split: str = "train",
    max_samples: int | None = None,
    files: list[Path] | None = None,
):
    """Yield document strings from a source: ``stdlib``, files/directories, or a Hub data set.

    ``files``: the source's already resolved local files (see :func:`resolve_files`), if known.
    """
    files = files if files is not None else resolve_files(source)
    count = 0
    if files is None:
        yield from _hub_documents(source, text_field, split, max_samples)
        return
    for path in files:
        for text in _file_documents(path, text_field):
            yield text
            count += 1
            if max_samples is not None and count >= max_samples:
                return


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    import datasets

    kind = "parquet" if suffix == ".parquet" else "json"
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - datasets raises many types for unreadable files
        raise DataError(f"cannot read {path} as {kind}: {err}") from None
    if text_field not in ds.column_names:
        raise DataError(
            f"data.text_field: {path} has no field {text_field!r}; its fields are {', '.join(ds.column_names)}"
        )
    for row in ds:
        if row[text_field]:
            yield str(row[text_field])


def _hub_documents(name: str, text_field: str, split: str, max_samples: int | None) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:  # noqa: BLE001
        raise DataError(
            f"data.source {name!r} is neither a local file/directory nor a loadable Hub data set: {err}"
        ) from None
    for i, row in enumerate(ds):
        if max_samples is not None and i >= max_samples:
            return
        if text_field not in row:
            raise DataError(f"data.text_field: {name} has no field {text_field!r}; its fields are {', '.join(row)}")
        yield str(row[text_field])


@dataclass
class TokenBlocks:
    """Training sequences: ``blocks`` is an ``(n_blocks, seq_len)`` int array of token ids."""

    blocks: np.ndarray
    documents: int
    tokens_read: int
    cache_path: Path | None = None

    def __len__(self) -> int:
        return len(self.blocks)


# Data settings added after the cache key was defined, with the value that builds the blocks as before
# they existed: left out of the key at that value, so that earlier runs' caches stay valid.
ADDED_SETTINGS = {"retrieval_spread": "random", "retrieval_recalls": "tail"}


def _fingerprint(data, tokenizer, files: list[Path] | None) -> str:
    h = hashlib.sha256()
    settings = {k: v for k, v in data.__dict__.items() if k not in ADDED_SETTINGS or v != ADDED_SETTINGS[k]}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    h.update(str(len(tokenizer)).encode())
    h.update(str(tokenizer.eos_token_id).encode())
    for f in files or []:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def build_blocks(data, tokenizer, cache_dir: Path | None = None) -> TokenBlocks:
    """Tokenise the documents of a recipe's data section and pack (or truncate) to ``seq_len``.

    Packing concatenates documents separated by the EOS token and cuts ``seq_len`` blocks
    (the remainder is dropped). Without packing each document gives one block of its first
    ``seq_len`` tokens, and shorter documents are an error. Results are cached under
    ``cache_dir`` keyed by the data settings, tokenizer and source files.
    """
    files = resolve_files(data.source)
    key = _fingerprint(data, tokenizer, files) if files is not None else None
    cache_path = Path(cache_dir) / f"blocks-{key}.npz" if cache_dir and key else None
    if cache_path is not None and cache_path.is_file():
        saved = np.load(cache_path)
        return TokenBlocks(saved["blocks"], int(saved["documents"]), int(saved["tokens_read"]), cache_path)

    seq_len, eos = data.seq_len, tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token, which packing needs to separate documents")
    stream: list[int] = []
    blocks: list[np.ndarray] = []
    short = documents = tokens_read = 0
    budget = data.max_tokens
    for text in iter_documents(data.source, data.text_field, data.split, data.max_samples, files=files):
        documents += 1
        ids = tokenizer(text, add_special_tokens=False).input_ids
        tokens_read += len(ids)
        if data.packing:
            stream.extend(ids)
            stream.append(eos)
            while len(stream) >= seq_len:
                blocks.append(np.asarray(stream[:seq_len], dtype=np.int64))
                del stream[:seq_len]
        elif len(ids) >= seq_len:
            blocks.append(np.asarray(ids[:seq_len], dtype=np.int64))
        else:
            short += 1
        if budget is not None and len(blocks) * seq_len >= budget:
            break
    if documents == 0:
        raise DataError(f"data.source {data.source!r} produced no documents (empty files or data set?)")
    if not blocks:
        if not data.packing:
            raise DataError(
                f"all {documents} documents are shorter than data.seq_len={seq_len} tokens with data.packing off; "
                "turn data.packing on or lower data.seq_len"
            )
        raise DataError(
            f"data.source {data.source!r} holds only {tokens_read} tokens, fewer than one block of "
            f"data.seq_len={seq_len}; add data or lower data.seq_len"
        )
    if short and not data.packing:
        raise DataError(
            f"{short} of {documents} documents are shorter than data.seq_len={seq_len} tokens with data.packing "
            "off; turn data.packing on, lower data.seq_len, or filter the documents"
        )
    stacked = np.stack(blocks)
    if data.retrieval:
        from .retrieval_data import mix_retrieval

        try:
            stacked = mix_retrieval(
                stacked,
                tokenizer,
                data.retrieval,
                data.retrieval_records,
                data.seed,
                data.retrieval_spread,
                data.retrieval_recalls,
            )
        except ValueError as err:
            raise DataError(str(err)) from None
    result = TokenBlocks(stacked, documents, tokens_read, cache_path)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp.npz")
        np.savez(tmp, blocks=result.blocks, documents=documents, tokens_read=tokens_read)
        tmp.replace(cache_path)
    return result


def block_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """A deterministic permutation of the blocks for one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n_blocks)


def batch_indices(n_blocks: int, seed: int, micro_step: int, batch_size: int) -> np.ndarray:
    """Block indices of global micro-step ``micro_step`` (epochs reshuffle; resumable by position)."""
    start = micro_step * batch_size
    out = []
    for i in range(start, start + batch_size):
        epoch, pos = divmod(i, n_blocks)
        out.append(block_order(n_blocks, seed, epoch)[pos])
    return np.asarray(out)


def read_counts(n_blocks: int, seed: int, reads: int) -> np.ndarray:
    """``(n_blocks,)`` int: how often each block is among the first ``reads`` reads of :func:`batch_indices`.

    Global read i is position ``i mod n_blocks`` of epoch ``i // n_blocks``'s :func:`block_order`.
    """
    full, rest = divmod(reads, n_blocks)
    counts = np.full(n_blocks, full, dtype=np.int64)
    counts[block_order(n_blocks, seed, full)[:rest]] += 1
    return counts


READS_FILE = "data.json"  # in a run's output directory: what it reads (:func:`describe_reads`)


def describe_reads(blocks: TokenBlocks, data, sequences: int) -> tuple[dict, list[str]]:
    """What a run reading ``sequences`` training sequences of ``blocks`` reads, as a record and log lines.

    data: the recipe's data section; sequences: steps x grad_accum x batch_size x data-parallel
    processes. With ``data.retrieval`` the record counts the retrieval sequences and records
    among them (:func:`ctxext.retrieval_data.retrieval_reads`).
    """
    n = len(blocks)
    record = {
        "blocks": n,
        "seq_len": int(blocks.blocks.shape[1]),
        "documents": blocks.documents,
        "sequences": sequences,
        "passes": sequences / n,
    }
    lines = [
        f"data: {n:,} blocks of {record['seq_len']:,} tokens from {blocks.documents:,} documents; the run reads "
        f"{sequences:,} sequences ({record['passes']:.2f} passes)"
    ]
    if data.retrieval:
        from .retrieval_data import retrieval_reads

        reads = retrieval_reads(n, data, sequences)
        record["retrieval"] = {"spread": data.retrieval_spread, "recalls": data.retrieval_recalls, **reads.__dict__}
        lines.append(reads.describe())
    return record, lines
