"""prepare/: real corpora to real memmaps, crash-safe, split without leaks."""
import json
import os

import numpy as np
import pytest

from conftest import run_script
from data import BinDataset
from tokenizer import tokenizer_from_meta


@pytest.fixture(scope="module")
def shakespeare_char(tmp_path_factory):
    out = tmp_path_factory.mktemp("shk") / "char"
    run_script("prepare/shakespeare.py", f"out={out}")
    return out


def test_shakespeare_plain_text_split_by_play(shakespeare_char):
    meta = json.loads((shakespeare_char / "meta.json").read_text())
    assert meta["tokenizer"] == "char" and meta["dtype"] == "uint16" and not meta["has_mask"]
    assert len(meta["train_plays"]) + len(meta["val_plays"]) == 38
    assert not set(meta["train_plays"]) & set(meta["val_plays"])
    tok = tokenizer_from_meta(meta)
    text = {s: tok.decode(np.fromfile(shakespeare_char / f"{s}.bin", dtype=np.uint16)) for s in ("train", "val")}
    assert len(text["train"]) == meta["train_tokens"] and len(text["val"]) == meta["val_tokens"]
    for t in text.values():
        for syntax in ("**", "#", "_", "\\[", "*"):
            assert syntax not in t, syntax
    # titles are the first line of each play: Coriolanus is held out, Hamlet trains
    assert "coriolanus" in meta["val_plays"] and "\nCoriolanus\n" not in text["train"]
    assert text["val"].startswith("Coriolanus\n") or "\nCoriolanus\n" in text["val"]
    assert "Hamlet\n\nACT I" in text["train"] and "HAMLET\nTo be, or not to be" in text["train"]


def test_shakespeare_gpt2_parallel_equals_serial(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_script("prepare/shakespeare.py", "tokenizer=gpt2", f"out={a}", "num_proc=1")
    run_script("prepare/shakespeare.py", "tokenizer=gpt2", f"out={b}", "num_proc=2")
    for f in ("train.bin", "val.bin"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    data = BinDataset(str(a))
    assert data.vocab_size == 50257 and (np.asarray(data.tokens["val"]) == 50256).sum() == 3  # 4 plays


def test_text_files_eot_between_documents(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    for i in range(12):
        (docs / ("sub" if i % 2 else "") / f"d{i:02d}.txt").write_text(f"Document number {i}. " * 20)
    run_script("prepare/text.py", f"input={docs}", f"out={tmp_path / 'out'}", "num_proc=1")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    assert (train == 50256).sum() == 10  # 11 train docs, separated
    assert meta["val_tokens"] > 0 and "every 10th" in meta["split"]


def test_single_document_char_split(tmp_path):
    (tmp_path / "one.txt").write_text("abcdefghij" * 100)
    run_script("prepare/text.py", f"input={tmp_path / 'one.txt'}", "tokenizer=char", f"out={tmp_path / 'o'}")
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["train_tokens"] == 900 and meta["val_tokens"] == 100 and meta["vocab_size"] == 11


def test_empty_corpus_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("   \n")
    p = run_script("prepare/text.py", f"input={tmp_path / 'empty'}", f"out={tmp_path / 'o'}", check=False)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: ") and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_interrupted_prepare_leaves_no_dataset(tmp_path, monkeypatch):
    """A crash mid-write leaves no meta.json and no final bin, so nothing mistakes it for data."""
    import prepare.common as common
    from tokenizer import get_tokenizer
    out = tmp_path / "crash"
    calls = {"n": 0}
    real = common._encode

    def dying(item):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(item)
    monkeypatch.setattr(common, "_encode", dying)
    with pytest.raises(KeyboardInterrupt):
        common.write_dataset(str(out), {"train": ["a b c"] * 5, "val": ["d e"]}, get_tokenizer("gpt2"),
                             source="t", split_rule="t")
    assert not (out / "meta.json").exists() and not (out / "train.bin").exists()
    assert os.listdir(out) == []  # no torn .tmp either
    with pytest.raises(Exception, match="no meta.json"):
        BinDataset(str(out))


def _bins(folder, split, mask=False):
    tokens = np.fromfile(folder / f"{split}.bin", dtype=np.uint16)
    return (tokens, np.fromfile(folder / f"{split}.mask.bin", dtype=np.uint8)) if mask else tokens


def test_jsonl_mask_and_bad_lines_reported(tmp_path):
    lines = [json.dumps(dict(prompt=f"Q{i}: what is {i}+{i}?", response=f" It is {2 * i}.")) for i in range(12)]
    lines[2] = "{not json"
    lines[5] = json.dumps(dict(prompt="no answer"))
    lines[7] = json.dumps(dict(prompt="blank", response="   "))
    lines.insert(9, "")  # blank lines are not records
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    p = run_script("prepare/jsonl.py", f"input={tmp_path / 'r.jsonl'}", f"out={tmp_path / 'o'}", "num_proc=1")
    warning = [l for l in p.stderr.splitlines() if l.startswith("warning: ")]
    assert len(warning) == 1 and "skipped 3 of 12 lines" in warning[0]
    assert "line 3 (not JSON: " in warning[0] and "line 6 (missing response)" in warning[0] and "line 8 (empty response)" in warning[0]
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["has_mask"] and meta["train_tokens"] == len(_bins(tmp_path / "o", "train"))
    tok = tokenizer_from_meta(meta)
    good = [i for i in range(12) if i not in (2, 5, 7)]  # 9 records, index 5 of them is val
    for split, recs in (("train", good[:5] + good[6:]), ("val", [good[5]])):
        tokens, mask = _bins(tmp_path / "o", split, mask=True)
        assert len(mask) == len(tokens) and (tokens == 50256).sum() == len(recs) and tokens[-1] == 50256
        # the targets are exactly the responses and their end-of-text
        assert tok.decode(tokens[mask == 1]) == "".join(f" It is {2 * i}.<|endoftext|>" for i in recs)
        assert tok.decode(tokens[mask == 0]) == "".join(f"Q{i}: what is {i}+{i}?" for i in recs)
    p = run_script("prepare/jsonl.py", f"input={tmp_path / 'r.jsonl'}", f"out={tmp_path / 'p'}",
                   "train_on_prompt=True", "tokenizer=char")
    tokens, mask = _bins(tmp_path / "p", "train", mask=True)
    assert mask.all() and BinDataset(str(tmp_path / "p")).masks["val"].all()


def test_jsonl_all_bad_is_an_error(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"prompt": "a"}\n[1, 2]\n')
    p = run_script("prepare/jsonl.py", f"input={tmp_path / 'r.jsonl'}", f"out={tmp_path / 'o'}", check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'r.jsonl'}:1: missing response")
    assert "no line is usable" in err[0] and "line 2 (not a JSON object (a list))" in err[0]


BABYLM = ["bnc_spoken", "childes", "gutenberg", "open_subtitles", "simple_wiki", "switchboard"]


def test_babylm_merged_95_5_split(tmp_path):
    folder = tmp_path / "train_10M"
    folder.mkdir()
    for name in reversed(BABYLM):  # creation order must not matter, names do
        (folder / f"{name}.train").write_text("".join(f"{name} says line {i}.\n" for i in range(100)))
    run_script("prepare/babylm.py", f"input={folder}", f"out={tmp_path / 'o'}", "num_proc=1")
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["files"] == [f"{n}.train" for n in BABYLM] and meta["val_sources"] == ["switchboard.train"]
    tok = tokenizer_from_meta(meta)
    lines = [f"{n} says line {i}." for n in BABYLM for i in range(100)]  # 600 lines: 570 train, 30 val
    train = tok.decode(_bins(tmp_path / "o", "train")).split("<|endoftext|>")
    assert len(train) == 6 and "".join(train).splitlines() == lines[:570]
    assert tok.decode(_bins(tmp_path / "o", "val")).splitlines() == lines[570:]


WIKI = " \n = {0} = \n \n {0} is an article . \n \n = = Section = = \n \n More about {0} . \n"


def test_wikitext_local_files_keep_their_split(tmp_path):
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    (folder / "wiki.train.raw").write_text("".join(WIKI.format(t) for t in ("Apple", "Pear", "Plum")))
    (folder / "wiki.valid.raw").write_text(WIKI.format("Fig"))
    (folder / "wiki.test.raw").write_text(WIKI.format("Secret"))
    run_script("prepare/wikitext.py", f"input={folder}", f"out={tmp_path / 'o'}", "num_proc=1")
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["train_articles"] == 3 and meta["val_articles"] == 1 and "train / validation" in meta["split"]
    tok = tokenizer_from_meta(meta)
    train, val = (tok.decode(_bins(tmp_path / "o", s)) for s in ("train", "val"))
    # an article runs from its " = Title = " line to the next one (the raw file's " \n" between them included)
    assert train.split("<|endoftext|>")[1] == WIKI.format("Pear")[2:] + " \n"
    assert val == WIKI.format("Fig")[2:] and "Secret" not in train + val  # the file's leading " \n" is no article


def test_openwebtext_local_txt_and_jsonl(tmp_path):
    (tmp_path / "owt").mkdir()
    (tmp_path / "owt" / "a.txt").write_text("A web page about cats.")
    (tmp_path / "owt" / "b.jsonl").write_text("\n".join(json.dumps(dict(text=f"Page {i}.")) for i in range(9))
                                            + '\n{"url": "x"}\n')
    p = run_script("prepare/openwebtext.py", f"input={tmp_path / 'owt'}", "val_fraction=0.2",
                   f"out={tmp_path / 'o'}", "num_proc=1")
    assert "skipped 1 of 10 lines: line 10 (missing text)" in p.stderr
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    tok = tokenizer_from_meta(meta)
    assert tok.decode(_bins(tmp_path / "o", "val")) == "Page 1.<|endoftext|>Page 6."  # docs 2 and 7 of 10


@pytest.mark.parametrize("script", ["openwebtext", "wikitext", "babylm"])
def test_hub_sources_offline_name_the_local_alternative(tmp_path, script):
    env = dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # fail fast where datasets is installed
    p = run_script(f"prepare/{script}.py", f"out={tmp_path / 'o'}", check=False, env=env)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and "input=" in err[0]
    assert not (tmp_path / "o").exists()


# The hub scripts with a dataset built here by the `datasets` library and saved to disk: all of
# their path but the download.


def test_openwebtext_from_a_saved_dataset_seeded_split(tmp_path):
    from datasets import Dataset, DatasetDict
    docs = [f"Web page {i}: " + "some words. " * (i % 5 + 1) for i in range(40)]
    DatasetDict(train=Dataset.from_dict(dict(text=docs, url=[f"u{i}" for i in range(40)]))).save_to_disk(
        str(tmp_path / "owt"))
    run_script("prepare/openwebtext.py", f"hf_dataset={tmp_path / 'owt'}", "val_fraction=0.1", "seed=7",
               f"out={tmp_path / 'o'}", "num_proc=1")
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    tok = tokenizer_from_meta(meta)
    split = {s: tok.decode(_bins(tmp_path / "o", s)).split("<|endoftext|>") for s in ("train", "val")}
    # nanoGPT's split: the library's seeded shuffle, ceil(0.1 * 40) = 4 documents held out
    expected = Dataset.from_dict(dict(text=docs)).train_test_split(test_size=0.1, seed=7, shuffle=True)
    assert split["val"] == expected["test"]["text"] and split["train"] == expected["train"]["text"]
    assert len(split["val"]) == 4 and sorted(split["train"] + split["val"]) == sorted(docs)
    for s, texts in split.items():  # documents plus one separator between each two
        assert meta[f"{s}_tokens"] == sum(len(tok.encode(t)) for t in texts) + len(texts) - 1
    assert "random 10.00% of documents to val (seed 7)" == meta["split"] and "40 documents" in meta["source"]


def test_babylm_from_a_saved_dataset_95_5_by_lines(tmp_path):
    from datasets import Dataset
    lines = [f"Child says thing {i}." + ("\n" if i % 3 else "") for i in range(200)]  # newline or not
    Dataset.from_dict(dict(text=lines)).save_to_disk(str(tmp_path / "babylm"))  # one unnamed split
    run_script("prepare/babylm.py", f"hf_dataset={tmp_path / 'babylm'}", f"out={tmp_path / 'o'}",
               "tokenizer=char", "num_proc=1")
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    tok = tokenizer_from_meta(meta)
    whole = [line.rstrip("\n") + "\n" for line in lines]
    assert tok.decode(_bins(tmp_path / "o", "train")) == "".join(whole[:190])  # the first 95% of lines
    assert tok.decode(_bins(tmp_path / "o", "val")) == "".join(whole[190:])
    assert meta["train_tokens"] == len("".join(whole[:190])) and meta["val_tokens"] == len("".join(whole[190:]))
    assert meta["files"] == meta["val_sources"] == [str(tmp_path / "babylm")] and "first 95%" in meta["split"]


def test_wikitext_from_a_saved_dataset_equals_the_raw_files(tmp_path):
    """The hub gives the raw files' lines, blank lines emptied; a saved copy of that makes the very
    bins the raw files make."""
    from datasets import Dataset, DatasetDict
    raw = {"train": "".join(WIKI.format(t) for t in ("Apple", "Pear", "Plum")), "valid": WIKI.format("Fig"),
           "test": WIKI.format("Secret")}
    (tmp_path / "raw").mkdir()
    for split, text in raw.items():
        (tmp_path / "raw" / f"wiki.{split}.raw").write_text(text)
    rows = {("validation" if s == "valid" else s): [r if r.strip() else "" for r in t.splitlines(keepends=True)]
            for s, t in raw.items()}
    DatasetDict({s: Dataset.from_dict(dict(text=r)) for s, r in rows.items()}).save_to_disk(str(tmp_path / "wt"))
    run_script("prepare/wikitext.py", f"input={tmp_path / 'raw'}", f"out={tmp_path / 'a'}", "num_proc=1")
    run_script("prepare/wikitext.py", f"config={tmp_path / 'wt'}", f"out={tmp_path / 'b'}", "num_proc=1")
    for f in ("train.bin", "val.bin"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert (meta["train_articles"], meta["val_articles"]) == (3, 1) and "local copy" in meta["source"]
    tok = tokenizer_from_meta(meta)
    assert tok.decode(_bins(tmp_path / "b", "val")) == WIKI.format("Fig")[2:]
    assert meta["train_tokens"] == len(_bins(tmp_path / "b", "train"))


def test_saved_dataset_without_the_needed_split_or_column(tmp_path):
    from datasets import Dataset, DatasetDict
    DatasetDict(validation=Dataset.from_dict(dict(body=["x"]))).save_to_disk(str(tmp_path / "d"))
    for script, args, message in (("openwebtext", [f"hf_dataset={tmp_path / 'd'}"], "needs a 'train' split"),
                                  ("wikitext", [f"config={tmp_path / 'd'}"], "needs a 'train' split")):
        p = run_script(f"prepare/{script}.py", *args, f"out={tmp_path / 'o'}", check=False)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(err) == 1 and message in err[0], p.stderr
    DatasetDict(train=Dataset.from_dict(dict(body=["x"]))).save_to_disk(str(tmp_path / "e"))
    p = run_script("prepare/babylm.py", f"hf_dataset={tmp_path / 'e'}", f"out={tmp_path / 'o'}", check=False)
    assert p.returncode == 2 and "the train split has no 'text' column (it has body)" in p.stderr
    assert not (tmp_path / "o").exists()
