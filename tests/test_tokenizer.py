"""The offline GPT-2 tokenizer is GPT-2's, and refuses a vocabulary that is not."""
import shutil
import subprocess
import sys

import pytest

from configurator import UserError
from tokenizer import _packaged_files, get_tokenizer, gpt2_encoding


def test_hello_world_and_eot():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eot == 50256 and tok.vocab_size == 50257
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"
    assert tok.encode("<|endoftext|>") != [50256]  # ordinary text never becomes the special token


@pytest.mark.parametrize("text", ["naïve café — Ünïcödé", "日本語のテキスト 中文", "emoji 🤖🧪👩‍🔬!",
                                  "  spaces\t\ttabs\n\n\nnewlines   ", "x" * 1000, "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b zero-width"])
def test_round_trip(text):
    tok = get_tokenizer("gpt2")
    assert tok.decode(tok.encode(text)) == text


def test_tampered_vocab_refused(tmp_path):
    bpe, enc = _packaged_files()
    bad = tmp_path / "vocab.bpe"
    shutil.copy(bpe, bad)
    data = bytearray(bad.read_bytes())
    data[200] = ord("Z") if data[200] != ord("Z") else ord("Y")
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError, match="not GPT-2's vocabulary"):
        gpt2_encoding(str(bad), enc)


def test_stale_tiktoken_cache_cannot_replace_verified_files(tmp_path, monkeypatch):
    """tiktoken caches files by their path; a wrong cached copy must not be used."""
    import hashlib
    bpe, enc = _packaged_files()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    for path in (bpe, enc):
        (tmp_path / hashlib.sha1(path.encode()).hexdigest()).write_bytes(b"not a vocabulary")
    assert gpt2_encoding(bpe, enc).encode_ordinary("Hello world") == [15496, 995]


def test_equals_tiktoken_online_where_available():
    """tiktoken's own download; skipped quickly when there is no network."""
    code = "import tiktoken; e = tiktoken.get_encoding('gpt2'); print(e.encode_ordinary(open(0).read()))"
    text = "The quick brown fox — 123 jumps; naïve 日本 🤖\n\n  end"
    try:
        p = subprocess.run([sys.executable, "-c", code], input=text, capture_output=True, text=True,
                           timeout=20)
    except subprocess.TimeoutExpired:
        pytest.skip("no network for tiktoken's download")
    if p.returncode != 0:
        pytest.skip("no network for tiktoken's download")
    assert eval(p.stdout) == get_tokenizer("gpt2").encode(text)


def test_char_tokenizer():
    tok = get_tokenizer("char", chars="\n !abc")
    ids = tok.encode("ab c!\n")
    assert tok.decode(ids) == "ab c!\n" and max(ids) < tok.vocab_size == 6
    with pytest.raises(UserError, match="not in this char vocabulary"):
        tok.encode("z")
