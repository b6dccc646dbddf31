"""Generated inputs for every reader of user files: JSONL (four readers), CSV and meta.json.

Each input is built from parts whose verdict is known by construction (a good record, a record
with one field broken, a line that is not UTF-8, ...), so every test asserts which outcome is
right: the exact parse, or a one-line UserError naming the first bad line. Never a traceback.
"""
import contextlib
import csv
import io
import json
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import labelled_text
import sample
from configurator import UserError
from data import BinDataset
from inputs import SHOW_BAD
from prepare.jsonl import read_records
from prepare.openwebtext import local_documents

# derandomised: the same 1,000 inputs on every run, so a failure replays and CI never flakes
FUZZ = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

GOOD, BAD, BLANK = "good", "bad", "blank"
any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)  # JSON escapes \n, \r
nonblank = any_text.filter(lambda s: s.strip())
one_line = st.text(st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), max_size=6)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(any_text, inner, max_size=2), max_leaves=4)


def one_line_error(e):
    event("refused")  # --hypothesis-show-statistics shows how often each outcome was tried
    message = str(e)
    assert message and "\n" not in message, repr(message)
    return message


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------- JSONL


def reader_sample(path):
    return sample.read_prompts(path)


def reader_prepare_jsonl(path):
    return read_records(path, "prompt", "response")


def reader_openwebtext(path):
    return local_documents(path)


def reader_classify(path):
    return labelled_text.read_rows(path)


label_values = st.integers(-10 ** 6, 10 ** 6) | nonblank
# values that make a required field bad: a string field / a label; blank too where it must not be
broken_string = st.none() | st.integers() | st.booleans() | st.lists(st.integers(), max_size=2)
broken_label = (st.none() | st.booleans() | st.floats(allow_nan=False) | st.just("  ")
                | st.lists(st.integers(), max_size=2))
LINE_KINDS = st.sampled_from(["good"] * 4 + ["field", "missing", "not_object", "cut", "not_utf8", "surrogate",
                                            "garbage", "blank"])
NOT_OBJECTS = st.lists(json_values, max_size=2) | st.integers() | any_text | st.none()


class Fields:
    """The strategies of one reader's records, built once (building them per draw is slow)."""

    def __init__(self, fields):
        extra = st.dictionaries(any_text.filter(lambda k: k not in fields), json_values, max_size=2)
        self.records = st.builds(lambda e, r: {**e, **r}, extra, st.fixed_dictionaries(fields))
        self.keys = st.sampled_from(sorted(fields))
        self.broken = {k: broken_label if k == "label" else broken_string | st.just(" \t") if v is nonblank
                       else broken_string for k, v in fields.items()}


# per reader: its record fields, what a good record parses to, whether bad lines are skipped
# with a warning, and its message for a file without records
JSONL_READERS = {
    "sample": (reader_sample, Fields(dict(prompt=any_text)),
               lambda n, r: (r["prompt"], {k: v for k, v in r.items() if k not in sample.RESERVED}),
               True, "holds no prompts"),
    "prepare_jsonl": (reader_prepare_jsonl, Fields(dict(prompt=any_text, response=nonblank)),
                      lambda n, r: (r["prompt"], r["response"]), True, "has no records"),
    "openwebtext": (reader_openwebtext, Fields(dict(text=nonblank)), lambda n, r: r["text"], True,
                    "no documents"),
    "classify": (reader_classify, Fields(dict(text=nonblank, label=label_values)),
                 lambda n, r: (n, r["text"], str(r["label"]).strip()), False, "holds no rows"),
}


@st.composite
def jsonl_line(draw, fields):
    """(line bytes, verdict, record or None)."""
    record = draw(fields.records)
    ascii_only = draw(st.booleans())
    kind = draw(LINE_KINDS)
    if kind == "good":
        return json.dumps(record, ensure_ascii=ascii_only).encode(), GOOD, record
    if kind in ("field", "missing", "surrogate"):
        key = draw(fields.keys)
        if kind == "missing":
            del record[key]
        elif kind == "surrogate":  # a lone half of a surrogate pair, as JSON can escape it
            record[key] = draw(any_text) + chr(draw(st.integers(0xD800, 0xDFFF))) + "x"
            ascii_only = True
        else:
            record[key] = draw(fields.broken[key])
        return json.dumps(record, ensure_ascii=ascii_only).encode(), BAD, None
    if kind == "not_object":
        return json.dumps(draw(NOT_OBJECTS)).encode(), BAD, None
    if kind == "cut":  # an object without its closing brace
        return json.dumps(record, ensure_ascii=ascii_only)[:-1].encode(), BAD, None
    if kind == "not_utf8":
        line = json.dumps(record, ensure_ascii=ascii_only).encode()
        at = draw(st.integers(0, len(line)))
        return line[:at] + b"\xff" + line[at:], BAD, None
    if kind == "garbage":  # '#' starts no JSON value
        return ("#" + draw(one_line)).encode(), BAD, None
    return draw(st.sampled_from(["", " ", "\t", " \t  "])).encode(), BLANK, None


@st.composite
def jsonl_file(draw, fields):
    lines = draw(st.lists(jsonl_line(fields), max_size=5))
    endings = [draw(st.sampled_from([b"\n", b"\r\n"])) for _ in lines]
    data = b"".join(line + end for (line, _, _), end in zip(lines, endings))
    if lines and draw(st.booleans()):
        data = data[:-len(endings[-1])]  # no newline after the last line
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data  # a UTF-8 byte-order mark
    return data, [(verdict, record) for _, verdict, record in lines]


@pytest.mark.parametrize("name", JSONL_READERS)
@FUZZ
@given(data=st.data())
def test_jsonl_readers(name, folder, data):
    read, fields, parsed, lenient, empty_message = JSONL_READERS[name]
    path = str(folder / f"{name}.jsonl")
    content, lines = data.draw(jsonl_file(fields))
    with open(path, "wb") as f:
        f.write(content)
    good = [parsed(n, r) for n, (v, r) in enumerate(lines, 1) if v == GOOD]
    bad = [n for n, (v, _) in enumerate(lines, 1) if v == BAD]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            result = read(path)
    except UserError as e:
        message = one_line_error(e)
        if bad and (not lenient or not good):
            assert message.startswith(f"{path}:{bad[0]}: "), message
        else:
            assert not good and not bad and empty_message in message, message
        return
    assert (bad and lenient or not bad) and good, "a UserError was due"
    assert result == good
    event("parsed")
    warning = stderr.getvalue()
    if bad:
        assert warning.count("\n") == 1
        assert warning.startswith(f"warning: {path}: skipped {len(bad)} of {len(bad) + len(good)} lines: ")
        assert all(f"line {n} (" in warning for n in bad[:SHOW_BAD])
    else:
        assert warning == ""


# ---------------------------------------------------------------- CSV


def at_char(text, k):
    """The byte offset of character k of text: where an inserted byte cannot split a character."""
    return len(text[:k].encode())


@st.composite
def csv_file(draw):
    """(bytes, rows [(verdict, text, label)], header, row end offsets, bad byte offset or None)."""
    header = draw(st.sampled_from([["text", "label"]] * 3 + [["label", "text"], ["text", "label", "id"],
                                                            ["text"], ["words", "label"], []]))
    # with \n line ends, csv.writer leaves a \r in a field unquoted: no reader could recover it
    end = draw(st.sampled_from(["\r\n", "\n"]))
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator=end)
    out.write(draw(st.sampled_from(["", "\ufeff"])))  # a byte-order mark, as Excel writes
    if header:
        writer.writerow(header)
    rows, ends = [], []
    for _ in range(draw(st.integers(0, 8))):
        text, label = draw(nonblank), draw(label_values)
        if end == "\n":
            text, label = text.replace("\r", ""), label.replace("\r", "") if isinstance(label, str) else label
        kind = draw(st.sampled_from(["good"] * 8 + ["text", "label", "short"]))
        if kind == "text":
            text = draw(st.sampled_from(["", " ", "\t "]))
        elif kind == "label":
            label = draw(st.sampled_from(["", "  "]))
        cells = [dict(text=text, label=label).get(h, "7") for h in header]
        writer.writerow(cells[:1] if kind == "short" else cells)  # short: a row of one cell
        rows.append((GOOD if kind == "good" else BAD, text, label))
        ends.append(len(out.getvalue()))
    text = out.getvalue()
    bad_char = draw(st.integers(0, len(text))) if draw(st.integers(0, 5)) == 0 else None
    data = text.encode()
    if bad_char is not None:
        at = at_char(text, bad_char)
        data = data[:at] + b"\xff" + data[at:]
        return data, rows, header, ends, at
    return data, rows, header, ends, None


def lines_through(text):
    """Lines the csv module counts in text: it breaks on \\r\\n, \\r and \\n alike."""
    return len(re.findall(r"\r\n|\r|\n", text))


@FUZZ
@given(csv_file())
def test_csv_reader(folder, generated):
    data, rows, header, ends, bad_byte = generated
    path = str(folder / "rows.csv")
    with open(path, "wb") as f:
        f.write(data)
    try:
        result = labelled_text.read_rows(path)
    except UserError as e:
        message = one_line_error(e)
        text = data.decode(errors="replace")
        if bad_byte is not None and b"\0" in data:  # null bytes besides: taken for a binary file
            assert message == f"{path}: not UTF-8 text but a binary file; name a text file"
        elif bad_byte is not None:
            line = data[:bad_byte].count(b"\n") + 1
            assert message == f"{path}:{line}: not UTF-8 text (byte {bad_byte + 1} of the file)"
        elif not {"text", "label"} <= set(header):
            assert message.startswith(f"{path}:1: the header needs columns text and label")
        elif all(verdict == GOOD for verdict, _, _ in rows):
            assert not rows and message == f"{path} holds no rows"
        else:  # named by the line its row ends on
            first_bad = next(i for i, (verdict, _, _) in enumerate(rows) if verdict == BAD)
            assert message.startswith(f"{path}:{lines_through(text[:ends[first_bad]])}: "), message
        return
    assert bad_byte is None and {"text", "label"} <= set(header), "a UserError was due"
    assert rows and all(verdict == GOOD for verdict, _, _ in rows), "a UserError was due"
    assert [(t, y) for _, t, y in result] == [(text, str(label).strip()) for _, text, label in rows]
    event("parsed")
    text = data.decode()
    assert [n for n, _, _ in result] == [lines_through(text[:e]) for e in ends]


# ---------------------------------------------------------------- meta.json


META_FAULTS = [None] * 6 + ["dtype", "vocab", "has_mask", "count", "bin_size", "empty_bin", "mask_missing",
                           "mask_length", "meta_cut", "meta_list", "meta_bytes", "meta_deep"]
BAD_VALUES = dict(dtype=st.sampled_from(["float32", "int8", "object", "uint64", 16, ["uint16"], None]),
                  vocab=st.sampled_from(["absent", True, 0, -5, 7.0, "65"]),
                  has_mask=st.sampled_from([1, 0, "yes", "true", None]),
                  count=st.sampled_from(["3", 2.0, True, None]))


@st.composite
def dataset_folder(draw):
    """(meta bytes, bins {name: bytes}, expected parse or None): a valid dataset, or one with a
    single fault, so that each check in the reader has inputs only it can refuse."""
    fault = draw(st.sampled_from(META_FAULTS))
    dtype = draw(st.sampled_from(["uint16", "uint32", "absent"]))
    np_dtype = np.dtype("uint16" if dtype == "absent" else dtype)
    limit = np.iinfo(np_dtype).max + 1
    vocab = draw(st.integers(1, limit))
    has_mask = draw(st.sampled_from(["absent", False, True]))
    meta = {k: v for k, v in dict(dtype=dtype, vocab_size=vocab, has_mask=has_mask).items() if v != "absent"}
    if fault == "dtype":
        meta["dtype"] = draw(BAD_VALUES["dtype"])
    elif fault == "vocab":
        bad = draw(BAD_VALUES["vocab"] | st.just(limit + 1))  # one past what the dtype can hold
        meta.pop("vocab_size") if bad == "absent" else meta.update(vocab_size=bad)
    elif fault == "has_mask":
        meta["has_mask"] = draw(BAD_VALUES["has_mask"])
    bins, tokens, masks = {}, {}, {}
    faulty_split = draw(st.sampled_from(["train", "val"]))
    for split in ("train", "val"):
        here = split == faulty_split
        n = 0 if fault == "empty_bin" and here else draw(st.integers(1, 6))
        tokens[split] = np.array(draw(st.lists(st.integers(0, min(vocab, 65536) - 1), min_size=n, max_size=n)),
                                 dtype=np_dtype)
        bins[f"{split}.bin"] = tokens[split].tobytes() + (b"\x01" if fault == "bin_size" and here else b"")
        if draw(st.booleans()):
            meta[f"{split}_tokens"] = n
        if fault == "count" and here:
            meta[f"{split}_tokens"] = draw(BAD_VALUES["count"] | st.sampled_from([n - 1, n + 1]))
        # masks whenever has_mask is set, also to a wrong value, so that only the value is wrong
        if meta.get("has_mask") not in (None, False, 0) and not (fault == "mask_missing" and here):
            m = n + draw(st.sampled_from([-1, 1])) if fault == "mask_length" and here else n
            masks[split] = np.array(draw(st.lists(st.integers(0, 1), min_size=m, max_size=m)), dtype=np.uint8)
            bins[f"{split}.mask.bin"] = masks[split].tobytes()
    if fault in ("mask_missing", "mask_length") and meta.get("has_mask") is not True:
        fault = None  # without a mask to read, neither is a fault
    meta_bytes = json.dumps(meta).encode()
    if fault == "meta_cut":
        meta_bytes = meta_bytes[:draw(st.integers(0, len(meta_bytes) - 1))]
    elif fault == "meta_list":
        meta_bytes = json.dumps([meta]).encode()
    elif fault == "meta_bytes":
        meta_bytes = b"\xff" + meta_bytes
    elif fault == "meta_deep":
        meta_bytes = b"[" * 100_000 + b"]" * 100_000
    if fault is not None:
        return meta_bytes, bins, None
    return meta_bytes, bins, dict(dtype=np_dtype, vocab=vocab, tokens=tokens, masks=masks)


@FUZZ
@given(dataset_folder())
def test_meta_json_loading(folder, generated):
    meta_bytes, bins, expected = generated
    d = folder / "data"
    d.mkdir(exist_ok=True)
    for f in os.listdir(d):
        os.remove(d / f)
    (d / "meta.json").write_bytes(meta_bytes)
    for name, data in bins.items():
        (d / name).write_bytes(data)
    try:
        ds = BinDataset(str(d))
    except UserError as e:
        one_line_error(e)
        assert expected is None, f"refused a valid dataset: {e}"
        return
    assert expected is not None, "accepted an invalid dataset"
    event("parsed")
    assert ds.dtype == expected["dtype"] and ds.vocab_size == expected["vocab"]
    for split in ("train", "val"):
        assert np.array_equal(ds.tokens[split], expected["tokens"][split])
    assert set(ds.masks) == set(expected["masks"])
    for split, m in expected["masks"].items():
        assert np.array_equal(ds.masks[split], m)
