"""Train your own byte-level BPE tokenizer (GPT-2's scheme) on local text or the embedded plays.

    python prepare/tokenizer.py                                        # the plays, 50257 tokens -> data/tokenizer
    python prepare/tokenizer.py vocab_size=4096 out=data/bpe4k         # -> data/bpe4k/tokenizer.json
    python prepare/tokenizer.py input=my_docs/,notes/*.txt vocab_size=16000 out=data/mytok
    python prepare/text.py input=my_docs/ tokenizer=data/mytok out=data/mine   # any prepare script

As GPT-2's: text is cut into words by GPT-2's pattern and words into bytes, so every text encodes
(no unknown token) and decodes back exactly; the most frequent adjacent pair is merged into a new
token until the vocabulary holds vocab_size tokens: <|endoftext|> (id 0, the document separator),
the 256 bytes, then the merges in the order they were learnt. The result is one tokenizer.json
(the HF tokenizers format), written atomically.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import UserError, run  # noqa: E402
from inputs import expand_files  # noqa: E402
from prepare.common import read_text, write_text_atomically  # noqa: E402
from prepare.plays import play_texts  # noqa: E402
from tokenizer import EOT_NAMES, TOKENIZER_FILE  # noqa: E402

DEFAULTS = dict(
    input="",  # .txt files, folders or globs, comma-separated; empty: the 38 embedded Shakespeare plays
    out="data/tokenizer",  # a folder (tokenizer.json is written in it) or a file name ending in .json
    vocab_size=50257,  # tokens in all (>= 257): <|endoftext|>, the 256 bytes, the merges; GPT-2 has 50257
    min_frequency=2,  # a pair seen fewer times than this is never merged
)
# vocab_size's bound is checked in main, where its message can say why
LIMITS = dict(min_frequency="[1, inf)")
BYTES = 256


def documents(spec):
    """(texts, how many): the files of input=, read one at a time, or the embedded plays."""
    if not spec:
        texts = list(play_texts().values())
        return texts, len(texts)
    files = expand_files(spec, ("txt",))
    if not files:
        raise UserError(f"input={spec!r}: no files found")
    return map(read_text, files), len(files)


def train_bpe(texts, n_texts, vocab_size, min_frequency):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # no prefix space: GPT-2 adds none either, and decode(encode(text)) stays exactly text
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=True,
                                  special_tokens=[EOT_NAMES[0]],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # tokenizers draws its own bars on a terminal; length= gives the first one its total, without
    # which it counts against 0
    tok.train_from_iterator(texts, trainer, length=n_texts)
    return tok


def output_path(out):
    path = out if out.endswith(".json") else os.path.join(out, TOKENIZER_FILE)
    folder = os.path.dirname(path) or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"out={out}: {folder} is a file, not a folder")
    return path


def main(cfg):
    if cfg["vocab_size"] < BYTES + 1:
        raise UserError(f"vocab_size={cfg['vocab_size']}: at least {BYTES + 1} (<|endoftext|> and the "
                        f"{BYTES} bytes), e.g. 4096, or 50257 as GPT-2")
    path = output_path(cfg["out"])
    texts, n_texts = documents(cfg["input"])
    n_bytes = 0

    def counted(texts):
        nonlocal n_bytes
        for text in texts:
            n_bytes += len(text.encode("utf-8"))
            yield text
    print(f"training a byte-level BPE of {cfg['vocab_size']} tokens on {n_texts} documents "
          f"({cfg['input'] or 'the embedded Shakespeare plays'})", flush=True)
    t0 = time.perf_counter()
    tok = train_bpe(counted(texts), n_texts, cfg["vocab_size"], cfg["min_frequency"])
    seconds = time.perf_counter() - t0
    if not n_bytes:
        raise UserError(f"input={cfg['input']!r}: the files hold no text to learn from")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_text_atomically(path, tok.to_str(pretty=True))
    learnt = tok.get_vocab_size()
    print(f"wrote {path}: {learnt} tokens from {n_bytes / 1e6:.2f} MB in {seconds:.1f} s "
          f"({n_bytes / 1e6 / seconds:.2f} MB/s)")
    if learnt < cfg["vocab_size"]:
        more = "lower min_frequency or add text" if cfg["min_frequency"] > 1 else "add text"
        print(f"note: {learnt} tokens, not {cfg['vocab_size']}: no other pair occurs at least "
              f"{cfg['min_frequency']} times in this text; for more, {more}")


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
