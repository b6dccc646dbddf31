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
    with pytest.raises(Exception, match="no meta.json"):
        BinDataset(str(out))
