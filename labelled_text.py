"""Labelled texts for classification: rows from CSV, JSONL or a Hugging Face dataset, tokenised
once and cached as arrays.

Local data is CSV (a header with `text` and `label` columns) or JSONL (objects with `text` and
`label`). Labels are ints or strings, numbered in sorted order. A bad row is an error naming its
file and line, never silently skipped: a classifier scored on quietly shrunken data misleads.
"""
import csv
import hashlib
import io
import json
import os
import re

import numpy as np
import torch

from configurator import UserError
from inputs import BadRecord, comma_list, field, hf_dataset, read_jsonl, read_text_file

HF_DATASETS = ("imdb", "ag_news")  # both have text/label columns and train/test splits
CACHE_VERSION = 1  # bump when the cached arrays change meaning
# csv's default cap is 128K characters a field; a long document is data, not an error
CSV_FIELD_LIMIT = 2 ** 31 - 1


# ---------------------------------------------------------------- reading rows


def _row(record):
    """(text, label) of a record (a JSON object, a CSV row, a dataset row)."""
    label = record.get("label")
    if label is None:
        raise BadRecord("missing label")
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise BadRecord(f"label must be an int or a string, got {type(label).__name__} {label!r}")
    if not str(label).strip():
        raise BadRecord("empty label")
    return field(record, "text"), str(label).strip()


def read_rows(path):
    """[(line, text, label)] of a CSV or JSONL file; any bad row is a UserError naming its line."""
    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        rows = _csv_rows(path)
    elif ext in (".jsonl", ".json"):
        rows = [(n, *row) for n, row in read_jsonl(path, _row)]
    else:
        raise UserError(f"{path}: use a .csv (text,label header) or .jsonl file")
    if not rows:
        raise UserError(f"{path} holds no rows")
    return rows


def _csv_rows(path):
    csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.DictReader(io.StringIO(read_text_file(path, ""), newline=""))
    rows = []
    try:
        if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
            found = ", ".join(map(repr, reader.fieldnames or [])) or "nothing"
            raise UserError(f"{path}:1: the header needs columns text and label, found {found}")
        for record in reader:
            line = reader.line_num  # the row's last line (a quoted field may span several)
            try:
                rows.append((line, *_row(record)))
            except BadRecord as e:
                raise UserError(f"{path}:{line}: {e}") from None
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    return rows


def sorted_labels(labels):
    """Label names in id order: numerically when all look like ints, else alphabetically."""
    uniq = set(labels)
    if all(re.fullmatch(r"-?\d+", s) for s in uniq):
        return sorted(uniq, key=int)
    return sorted(uniq)


def hf_rows(name):
    """Train and test rows of a Hugging Face dataset (imdb, ag_news, or a folder written by
    save_to_disk), and its label names when its label column names them (a ClassLabel)."""
    hint = ("pass local files instead: train_file=train.csv test_file=test.csv (columns text,label) "
            "or data=file.jsonl")
    splits = [hf_dataset(name, split=s, hint=hint, columns=("text", "label")) for s in ("train", "test")]
    names = getattr(splits[0].features["label"], "names", None)
    names = [str(n).strip() for n in names] if names else None
    rows = []
    for split, ds in zip(("train", "test"), splits):
        rows.append([])
        for i, (text, label) in enumerate(zip(ds["text"], ds["label"]), 1):
            try:
                if names and isinstance(label, int) and not isinstance(label, bool):
                    if not 0 <= label < len(names):
                        raise BadRecord(f"label {label} is none of the dataset's {len(names)} classes")
                    label = names[label]
                rows[-1].append((i, *_row(dict(text=text, label=label))))
            except BadRecord as e:
                raise UserError(f"{name} {split} row {i}: {e}") from None
    return rows[0], rows[1], names


def dataset_specs(cfg):
    """[(name, spec)]: spec is {"hf": name or folder} or {"train": path, "test": path or ""}."""
    specs = []
    for item in comma_list(cfg["data"], "data"):
        if item in HF_DATASETS or os.path.isdir(item):
            specs.append((source_name(item), dict(hf=item)))
        elif os.path.isfile(item):
            specs.append((source_name(item), dict(train=item, test="")))
        else:
            raise UserError(f"data={item!r}: use {' or '.join(HF_DATASETS)}, a dataset folder (written by "
                            f"save_to_disk), or an existing .csv/.jsonl file")
    if cfg["train_file"]:
        specs.append((source_name(cfg["train_file"]), dict(train=cfg["train_file"], test=cfg["test_file"])))
    elif cfg["test_file"]:
        raise UserError("test_file= needs train_file= beside it")
    if not specs:
        raise UserError(f"give data= ({', '.join(HF_DATASETS)}, a dataset folder, or a .csv/.jsonl file) "
                        f"or train_file= [test_file=]")
    return specs


def source_name(path):
    """A short name for a file or folder: its base name without extension."""
    return os.path.splitext(os.path.basename(path.rstrip("/")))[0] or "data"


# ---------------------------------------------------------------- tokenised, cached data


class TextSet:
    """Ragged token rows and their label ids; batches are right-padded to their longest row."""

    def __init__(self, ids, lengths, labels):
        self.ids, self.lengths, self.labels = ids, lengths, labels
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])

    def __len__(self):
        return len(self.lengths)

    def batch(self, rows, pad_id, device):
        lengths = self.lengths[rows]
        x = np.full((len(rows), int(lengths.max())), pad_id, dtype=np.int64)
        for r, i in enumerate(rows):
            x[r, :lengths[r]] = self.ids[self.offsets[i]:self.offsets[i + 1]]
        return (torch.from_numpy(x).to(device), torch.from_numpy(lengths.astype(np.int64)).to(device),
                torch.from_numpy(self.labels[rows]).to(device))


def _encode(rows, tok, max_len, label_ids, where):
    """where + line names a row: "path:" or "imdb train row "."""
    for line, _, label in rows:
        if label not in label_ids:
            raise UserError(f"{where}{line}: label {label!r} does not occur in the training data "
                            f"(labels: {', '.join(label_ids)})")
    texts = [text for _, text, _ in rows]
    try:
        encoded = tok.encode_batch(texts)
    except UserError:
        for line, text, _ in rows:  # find the row, so the message can name it
            try:
                tok.encode(text)
            except UserError as e:
                raise UserError(f"{where}{line}: {e}") from None
        raise
    lengths = np.array([min(len(e), max_len) for e in encoded], dtype=np.int32)
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise UserError(f"{where}{rows[empty[0]][0]}: the text encodes to no tokens")
    ids = np.concatenate([np.asarray(e[:max_len], dtype=np.int32) for e in encoded])
    return ids, lengths, np.array([label_ids[label] for _, _, label in rows], dtype=np.int64)


def _fingerprint(name, spec, tok_info, max_len, test_fraction):
    h = hashlib.sha256(json.dumps([CACHE_VERSION, name, tok_info, max_len], sort_keys=True).encode())
    files = [spec[key] for key in ("train", "test") if spec.get(key)]
    folder = spec.get("hf", "")
    if os.path.isdir(folder):  # a local dataset: its content, not just its name
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(folder) for f in names
                       if not f.startswith("cache-"))  # datasets' own cache files come and go
    for path in files:
        if folder:
            h.update(os.path.relpath(path, folder).encode())
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    if spec.get("train") and not spec.get("test"):
        h.update(str(test_fraction).encode())
    return h.hexdigest()[:12]


def load_data(name, spec, tok, tok_info, max_len, cfg):
    """(train TextSet, test TextSet, label names, cache path), tokenised once and cached."""
    if spec.get("train") and not os.path.isfile(spec["train"]):
        raise UserError(f"data file not found: {spec['train']}")
    if spec.get("test") and not os.path.isfile(spec["test"]):
        raise UserError(f"data file not found: {spec['test']}")
    path = os.path.join(cfg["cache_dir"],
                        f"{name}-{tok.name}-{_fingerprint(name, spec, tok_info, max_len, cfg['test_fraction'])}.npz")
    if not os.path.isfile(path):
        names = None
        if "hf" in spec:
            train_rows, test_rows, names = hf_rows(spec["hf"])
            train_where, test_where = f"{name} train row ", f"{name} test row "
        else:
            train_rows = read_rows(spec["train"])
            train_where = test_where = spec["train"] + ":"
            if spec["test"]:
                test_rows, test_where = read_rows(spec["test"]), spec["test"] + ":"
            else:
                if len(train_rows) < 2:
                    raise UserError(f"splitting {spec['train']} by test_fraction needs 2 or more rows")
                # a fixed permutation: the same rows are held out on every run and machine
                order = np.random.default_rng(0).permutation(len(train_rows))
                n_test = max(1, round(len(train_rows) * cfg["test_fraction"]))
                test_rows = [train_rows[i] for i in sorted(order[:n_test])]
                train_rows = [train_rows[i] for i in sorted(order[n_test:])]
        names = names or sorted_labels([label for _, _, label in train_rows])
        if len(names) < 2:
            raise UserError(f"{spec.get('train') or name}: the training rows hold only the label "
                            f"{names[0]!r}; a classifier needs 2 or more")
        label_ids = {label: i for i, label in enumerate(names)}
        arrays = {}
        for split, rows, where in (("train", train_rows, train_where), ("test", test_rows, test_where)):
            arrays[f"{split}_ids"], arrays[f"{split}_len"], arrays[f"{split}_labels"] = \
                _encode(rows, tok, max_len, label_ids, where)
        os.makedirs(cfg["cache_dir"], exist_ok=True)
        with open(path + ".tmp", "wb") as f:  # renamed whole: a killed run leaves no torn cache
            np.savez(f, labels=np.array(names), **arrays)
        os.replace(path + ".tmp", path)
        print(f"tokenised {name}: {len(train_rows)} train, {len(test_rows)} test rows -> {path}")
    with np.load(path, allow_pickle=False) as z:
        sets = [TextSet(z[f"{s}_ids"], z[f"{s}_len"], z[f"{s}_labels"]) for s in ("train", "test")]
        names = [str(n) for n in z["labels"]]
    return sets[0], sets[1], names, path
