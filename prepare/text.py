"""Any local text: .txt files, folders (searched recursively) or globs, comma-separated.

    python prepare/text.py input=notes/,more/*.txt tokenizer=gpt2 out=data/mytext

Each file is a document; documents are separated by <|endoftext|> (gpt2) or a blank line (char).
Every round(1/val_fraction)-th document goes to val; a single document is split 90/10 by text.
"""
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import UserError, run  # noqa: E402
from prepare.common import LIMITS as COMMON_LIMITS  # noqa: E402
from prepare.common import every_nth, resolve_num_proc, tokenizer_for, write_dataset  # noqa: E402

DEFAULTS = dict(
    input="",  # .txt files, folders (searched recursively) or globs, comma-separated
    out="data/text",  # the dataset folder written
    tokenizer="gpt2",  # gpt2 (BPE, offline) or char (a vocabulary of the corpus' characters)
    val_fraction=0.1,  # share of the documents that validate (of the text, for a lone document)
    num_proc=0,  # tokenising processes; 0: up to 4
)
LIMITS = dict(COMMON_LIMITS, val_fraction="(0, 1)")


def find_files(spec):
    files = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if os.path.isdir(part):
            files += sorted(glob.glob(os.path.join(part, "**", "*.txt"), recursive=True))
        elif os.path.isfile(part):
            files.append(part)
        else:
            matched = sorted(glob.glob(part, recursive=True))
            if not matched:
                raise UserError(f"input: nothing matches {part!r}")
            files += [m for m in matched if os.path.isfile(m)]
    return files


def split_documents(docs, val_fraction):
    """(train, val, rule): whole documents to val, or a 90/10 cut of a lone document."""
    held, every = every_nth(len(docs), val_fraction)
    if len(docs) == 1:
        cut = int(len(docs[0]) * (1 - val_fraction))
        return [docs[0][:cut]], [docs[0][cut:]], f"one document cut at {1 - val_fraction:.0%} of its text"
    train = [d for i, d in enumerate(docs) if i not in held]
    val = [docs[i] for i in sorted(held)]
    return train, val, f"every {every}th document to val"


def main(cfg):
    if not cfg["input"]:
        raise UserError("input= is required: .txt files, folders or globs, comma-separated")
    files = find_files(cfg["input"])
    docs = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            docs.append(text)
    if not docs:
        raise UserError(f"input={cfg['input']!r}: no non-empty .txt files found")
    train, val, rule = split_documents(docs, cfg["val_fraction"])
    tok = tokenizer_for(cfg["tokenizer"], docs)
    write_dataset(cfg["out"], {"train": train, "val": val}, tok, source=f"{len(docs)} files from {cfg['input']}",
                  split_rule=rule, num_proc=resolve_num_proc(cfg["num_proc"]))


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
