"""Any local text: .txt files, folders (searched recursively) or globs, comma-separated.

    python prepare/text.py input=notes/,more/*.txt tokenizer=gpt2 out=data/mytext

tokenizer= is gpt2, char, a tokenizer.json or a folder holding one (prepare/tokenizer.py trains one).
Each file is a document; documents are separated by the tokenizer's end-of-text token
(<|endoftext|> for gpt2 and our own BPE) or, without one (char), a blank line.
Every round(1/val_fraction)-th document goes to val; a single document is split 90/10 by text.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import UserError, run  # noqa: E402
from inputs import expand_files  # noqa: E402
from prepare.common import LIMITS as COMMON_LIMITS  # noqa: E402
from prepare.common import (read_documents, resolve_num_proc, split_every_nth, tokenizer_for,  # noqa: E402
                            write_dataset)

DEFAULTS = dict(
    input="",  # .txt files, folders (searched recursively) or globs, comma-separated
    out="data/text",  # the dataset folder written
    tokenizer="gpt2",  # gpt2 (BPE, offline), char (the corpus' characters), or a tokenizer.json or its folder
    val_fraction=0.1,  # share of the documents that validate (of the text, for a lone document)
    num_proc=0,  # tokenising processes; 0: up to 4
)
LIMITS = dict(COMMON_LIMITS, val_fraction="(0, 1)")


def split_documents(docs, val_fraction):
    """(train, val, rule): whole documents to val, or a 90/10 cut of a lone document."""
    splits, every = split_every_nth(docs, val_fraction)
    if len(docs) == 1:
        cut = int(len(docs[0]) * (1 - val_fraction))
        return [docs[0][:cut]], [docs[0][cut:]], f"one document cut at {1 - val_fraction:.0%} of its text"
    return splits["train"], splits["val"], f"every {every}th document to val"


def main(cfg):
    if not cfg["input"]:
        raise UserError("input= is required: .txt files, folders or globs, comma-separated")
    docs = read_documents(expand_files(cfg["input"], ("txt",)))
    if not docs:
        raise UserError(f"input={cfg['input']!r}: no non-empty .txt files found")
    train, val, rule = split_documents(docs, cfg["val_fraction"])
    tok = tokenizer_for(cfg["tokenizer"], docs)
    write_dataset(cfg["out"], {"train": train, "val": val}, tok, source=f"{len(docs)} files from {cfg['input']}",
                  split_rule=rule, num_proc=resolve_num_proc(cfg["num_proc"]))


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
