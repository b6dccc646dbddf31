"""Our own BPE end to end (train it, prepare with it, train, sample, evaluate, convert without the
file), and the one tokenizer identity rule at every place a model meets data or another model."""
import json
import os
import pty
import shutil
import sys

import numpy as np
import pytest
import torch

import checkpoint
import engine
from conftest import ROOT, TINY, make_char_dataset, run_script
from configurator import UserError
from data import BinDataset
from model import GPT, GPTConfig
from prepare.common import token_dtype, write_dataset
from prepare.plays import markdown_to_text, play_files
from tokenizer import (FileTokenizer, GPT2Tokenizer, check_same, difference, get_tokenizer,
                       tokenizer_from_meta, vocab_sha256)

VOCAB = 400
DOC_CHARS = 2500


def write_docs(folder, play, n=8):
    """n documents of a play's text, a few KB each."""
    with open(play_files()[play], encoding="utf-8") as f:
        text = markdown_to_text(f.read())
    os.makedirs(folder)
    docs = [text[i * DOC_CHARS:(i + 1) * DOC_CHARS] for i in range(n)]
    for i, doc in enumerate(docs):
        with open(os.path.join(folder, f"{i}.txt"), "w", encoding="utf-8") as f:
            f.write(doc)
    return docs


def one_line_error(p):
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    return p.stderr


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A 400-token BPE trained on 20 KB of Twelfth Night and a dataset prepared with it; then the
    tokenizer's folder is removed: what follows must do without the original file."""
    root = tmp_path_factory.mktemp("bpe")
    docs = write_docs(str(root / "docs"), "twelfth-night")
    p = run_script("prepare/tokenizer.py", f"input={root / 'docs'}", f"vocab_size={VOCAB}", f"out={root / 'tok'}")
    run_script("prepare/text.py", f"input={root / 'docs'}", f"tokenizer={root / 'tok'}", f"out={root / 'data'}",
               "num_proc=2")
    tok = dict(path=str(root / "tok" / "tokenizer.json"), files=os.listdir(root / "tok"))
    tok["text"] = (root / "tok" / "tokenizer.json").read_text(encoding="utf-8")
    shutil.rmtree(root / "tok")
    return dict(root=root, docs=docs, tok=tok, data=str(root / "data"), stdout=p.stdout)


@pytest.fixture(scope="module")
def run(bpe):
    """2 steps trained on the BPE data."""
    out = str(bpe["root"] / "run")
    run_script("train.py", f"dataset={bpe['data']}", f"out_dir={out}", *TINY, "max_iters=2", "final_eval=False")
    return out


@pytest.fixture(scope="module")
def other_data(bpe):
    """Same vocab size, another vocabulary: a BPE learnt from Hamlet."""
    root = bpe["root"] / "other"
    write_docs(str(root / "docs"), "hamlet")
    run_script("prepare/tokenizer.py", f"input={root / 'docs'}", f"vocab_size={VOCAB}", f"out={root / 'tok'}")
    run_script("prepare/text.py", f"input={root / 'docs'}", f"tokenizer={root / 'tok'}", f"out={root / 'data'}")
    return str(root / "data")


def test_trained_tokenizer_round_trips(bpe):
    tok = FileTokenizer(bpe["tok"]["text"], bpe["tok"]["path"])
    assert tok.vocab_size == VOCAB and tok.eot == 0
    assert f"wrote {bpe['tok']['path']}: {VOCAB} tokens" in bpe["stdout"] and bpe["tok"]["files"] == ["tokenizer.json"]
    ids = tok.encode(bpe["docs"][0])
    assert len(ids) < 0.7 * len(bpe["docs"][0].encode())  # 143 merges learnt from this text shorten it
    for text in ("naïve café 日本語 🤖 never seen", "  tabs\t\tand\n\n\nnewlines  ", "<|endoftext|> as text"):
        assert tok.decode(tok.encode(text)) == text
    assert 0 not in tok.encode("<|endoftext|>")  # ordinary text never becomes the separator


def test_progress_bar_shows_on_a_terminal(tmp_path):
    """tokenizers draws its bars only on a terminal: run the script on one."""
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    pid, fd = pty.fork()
    if pid == 0:  # the child becomes the script, its stdout and stderr the terminal
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "prepare/tokenizer.py", f"input={tmp_path / 'a.txt'}",
                                  "vocab_size=300", f"out={tmp_path / 'tok'}"])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")
    assert b"Compute merges" in out and b"wrote" in out


def test_prepared_data_records_and_carries_its_tokenizer(bpe):
    meta = json.loads(open(os.path.join(bpe["data"], "meta.json")).read())
    text = open(os.path.join(bpe["data"], "tokenizer.json"), encoding="utf-8").read()
    assert meta["tokenizer"] == "hf" and meta["vocab_size"] == VOCAB and meta["dtype"] == "uint16"
    assert meta["vocab_sha256"] == vocab_sha256(text) and meta["eot"] == 0
    data = BinDataset(bpe["data"])
    tok = tokenizer_from_meta(data.tokenizer)
    # documents 0-4, 6, 7 train and 5 is held out, separated by <|endoftext|> (two worker processes)
    train = [d for i, d in enumerate(bpe["docs"]) if i != 5]
    assert tok.decode(data.tokens["train"]) == "<|endoftext|>".join(train)
    assert tok.decode(data.tokens["val"]) == bpe["docs"][5]
    assert len(data.tokens["train"]) == meta["train_tokens"]


def test_a_changed_copy_beside_the_bins_is_refused(bpe, tmp_path):
    shutil.copytree(bpe["data"], tmp_path / "d")
    path = tmp_path / "d" / "tokenizer.json"
    content = json.loads(path.read_text(encoding="utf-8"))
    content["model"]["merges"] = content["model"]["merges"][::-1]
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(UserError, match="not the tokenizer .* was prepared with"):
        BinDataset(str(tmp_path / "d")).tokenizer


def test_checkpoint_samples_and_evaluates_without_the_file(bpe, run):
    assert not os.path.exists(bpe["tok"]["path"])
    model, info, ckpt = checkpoint.load_model(run)  # torch.load(weights_only=True)
    assert info["vocab_sha256"] == BinDataset(bpe["data"]).tokenizer["vocab_sha256"]
    tok = tokenizer_from_meta(info)
    prompt = "VIOLA: What country, friends"
    ids = tok.encode(prompt)
    row = engine.generate(model, [ids], 12, temperature=0.0, stop_tokens=[] if tok.eot is None else [tok.eot])[0].tokens
    p = run_script("sample.py", f"source={run}", f"start={prompt}", "num_samples=1", "max_new_tokens=12",
                   "temperature=0")
    assert p.stdout.split("-" * 40)[0] == prompt + tok.decode(row) + "\n"
    assert "hf tokenizer" in p.stderr

    out = bpe["root"] / "eval.json"
    run_script("evaluate.py", f"models=m={run}", f"dataset={bpe['data']}", f"out={out}")
    r = json.loads(out.read_text())["results"]["m"]
    assert r["tokens"] == len(BinDataset(bpe["data"]).tokens["val"]) - 1 and 0 < r["loss"] < 10
    text = bpe["root"] / "t.txt"
    text.write_text("If music be the food of love, play on. 🎶")
    run_script("evaluate.py", f"models=m={run}", f"text={text}", f"out={out}")
    assert json.loads(out.read_text())["results"]["m"]["tokens"] == len(tok.encode(text.read_text())) - 1


def test_exported_hf_folder_keeps_the_tokenizer(run, tmp_path):
    run_script("convert.py", "to=hf", f"source={run}", f"out={tmp_path / 'hf'}")
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    _, info, _ = checkpoint.load_model(str(tmp_path / "hf"))
    assert info["tokenizer"] == "hf" and difference(info, checkpoint.tokenizer_of(checkpoint.load(run))) is None


def test_other_vocabulary_refused_everywhere(run, other_data, tmp_path):
    expect = "same size but different vocabularies"
    p = run_script("train.py", f"dataset={other_data}", f"init_from={run}", f"out_dir={tmp_path / 'ft'}",
                   *TINY, "max_iters=1", check=False)
    assert expect in one_line_error(p) and "fine-tune on data prepared with the model's tokenizer" in p.stderr
    p = run_script("distill.py", f"dataset={other_data}", f"teacher={run}", f"out_dir={tmp_path / 'd'}",
                   *TINY, "max_iters=1", check=False)
    assert expect in one_line_error(p) and "must share one tokenizer" in p.stderr
    p = run_script("evaluate.py", f"models={run}", f"dataset={other_data}", f"out={tmp_path / 'e.json'}",
                   check=False)
    assert expect in one_line_error(p)
    assert not os.listdir(tmp_path)  # no run folder, no results


def test_resume_on_other_data_refused(run, other_data, tmp_path):
    shutil.copytree(run, tmp_path / "r")
    p = run_script("train.py", f"dataset={other_data}", "init_from=resume", f"out_dir={tmp_path / 'r'}",
                   *TINY, "max_iters=3", check=False)
    assert "resume on the data the run was started on" in one_line_error(p)
    assert sorted(os.listdir(tmp_path / "r")) == sorted(os.listdir(run))


def test_char_table_of_the_same_size_refused_for_fine_tuning(char_data, tmp_path):
    """Fine-tuning compared only the tokenizer's name: another table of the same size passed."""
    chars = BinDataset(char_data).tokenizer["chars"]
    other = make_char_dataset(str(tmp_path / "other"), (chars[:-1] + "\u263a") * 30)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=len(chars)))
    # a record as older checkpoints wrote it: no vocab_size
    checkpoint.save(dict(model=model.state_dict(), model_args=model.config.to_dict(), config={}, step=0,
                         best_val_loss=float("inf"), tokenizer=dict(tokenizer="char", chars=chars)),
                    str(tmp_path / "ck"), 0, 1, False)
    p = run_script("train.py", f"dataset={other}", f"init_from={tmp_path / 'ck'}", f"out_dir={tmp_path / 'ft'}",
                   *TINY, "max_iters=1", check=False)
    assert "same size but different characters (first at id" in one_line_error(p)
    assert not (tmp_path / "ft").exists()
    # the same old record on its own data is accepted
    run_script("train.py", f"dataset={char_data}", f"init_from={tmp_path / 'ck'}", f"out_dir={tmp_path / 'ok'}",
               *TINY, "max_iters=1", "final_eval=False")


def test_identity_of_old_and_new_records():
    gpt2 = dict(tokenizer="gpt2", vocab_size=50257)
    assert difference({}, gpt2) is None  # a checkpoint from before records: GPT-2
    assert difference(dict(tokenizer="gpt2"), gpt2) is None
    assert difference(dict(tokenizer="gpt2", vocab_size=50258), gpt2) == "different vocab sizes"
    ab = dict(tokenizer="char", chars="ab")  # char records from before vocab_size was stored
    assert difference(ab, dict(ab, vocab_size=2)) is None
    assert difference(ab, dict(ab, chars="abc")) == "different vocab sizes"
    assert "first at id 1: 'b' vs 'c'" in difference(ab, dict(ab, chars="ac"))
    a = dict(tokenizer="hf", vocab_size=400, vocab_sha256="a" * 64, tokenizer_path="x/tokenizer.json")
    assert difference(a, dict(a, tokenizer_path="elsewhere.json", tokenizer_json="{}")) is None  # where is not what
    assert difference(a, dict(a, vocab_sha256="b" * 64)) == "same size but different vocabularies"
    assert difference(a, gpt2) == "different kinds of tokenizer"
    with pytest.raises(UserError, match=r"^teacher t uses the tokenizer x/tokenizer.json \(vocab 400, sha256 "
                                        r"aaaaaaaaaaaa\) but dataset d uses the gpt2 tokenizer \(vocab 50257\): "
                                        r"different kinds of tokenizer; share one$"):
        check_same("teacher t", a, "dataset d", gpt2, "share one")


def test_tokenizer_that_does_not_fit_the_model_refused(run, tmp_path):
    """A checkpoint pairing a 300-token model with the 400-token tokenizer: one line, nothing written."""
    info = checkpoint.tokenizer_of(checkpoint.load(run))
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=300))
    checkpoint.save(dict(model=model.state_dict(), model_args=model.config.to_dict(), config={}, step=0,
                         best_val_loss=float("inf"), tokenizer=info), str(tmp_path / "ck"), 0, 1, False)
    (tmp_path / "p.txt").write_text("hello\n")
    p = run_script("sample.py", f"source={tmp_path / 'ck'}", f"prompts={tmp_path / 'p.txt'}",
                   f"out={tmp_path / 'o.jsonl'}", check=False)
    assert "does not fit its model's vocab of 300" in one_line_error(p)
    assert not (tmp_path / "o.jsonl").exists()


def test_vocab_over_65535_writes_uint32(tmp_path):
    """A synthetic 70,000-word tokenizer.json: ids past uint16 survive the bins."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = {f"w{i}": i for i in range(70_000)}
    words["<|endoftext|>"] = 70_000
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    tok = get_tokenizer(str(tmp_path))
    assert tok.vocab_size == 70_001 and tok.eot == 70_000
    meta = write_dataset(str(tmp_path / "d"), {"train": ["w1 w69999 w65536 w3"] * 5, "val": ["w65535 w70"]},
                         tok, source="synthetic", split_rule="given")
    data = BinDataset(str(tmp_path / "d"))
    assert meta["dtype"] == "uint32" and data.tokens["train"].dtype == np.uint32
    assert data.tokens["train"][:5].tolist() == [1, 69999, 65536, 3, 70_000]
    assert data.tokens["val"].tolist() == [65535, 70]
    assert (token_dtype(65536), token_dtype(65537), token_dtype(50257)) == (np.uint16, np.uint32, np.uint16)


def test_gpt2s_own_tokenizer_json_is_gpt2(tmp_path):
    """A HF GPT-2 folder's tokenizer.json is the gpt2 tokenizer: its data pairs with GPT-2 models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizer import _packaged_files
    vocab_bpe, encoder_json = _packaged_files()
    tok = Tokenizer(models.BPE.from_file(encoder_json, vocab_bpe))  # as HF's GPT-2 folders hold it
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert isinstance(get_tokenizer(str(tmp_path)), GPT2Tokenizer)
    content = json.loads((tmp_path / "tokenizer.json").read_text())
    content["pre_tokenizer"]["add_prefix_space"] = True  # same vocabulary, other ids
    (tmp_path / "tokenizer.json").write_text(json.dumps(content))
    assert isinstance(get_tokenizer(str(tmp_path)), FileTokenizer)


@pytest.mark.parametrize("args, message", [
    (["vocab_size=100"], "at least 257"),
    (["input=/nonexistent/*.txt"], "nothing matches"),
])
def test_tokenizer_script_bad_input(tmp_path, args, message):
    p = run_script("prepare/tokenizer.py", *args, f"out={tmp_path / 'tok'}", check=False)
    assert message in one_line_error(p) and not (tmp_path / "tok").exists()


def test_prepare_with_missing_tokenizer_refused(tmp_path):
    (tmp_path / "a.txt").write_text("some text\n")
    p = run_script("prepare/text.py", f"input={tmp_path / 'a.txt'}", f"tokenizer={tmp_path / 'nope'}",
                   f"out={tmp_path / 'd'}", check=False)
    assert "not found; use gpt2, char, a tokenizer.json or a folder holding one" in one_line_error(p)
    assert not (tmp_path / "d").exists()
