"""Prompt/response records (one JSON object a line) for fine-tuning, with a loss mask.

    python prepare/jsonl.py input=pairs.jsonl out=data/pairs              # GPT-2 BPE
    python prepare/jsonl.py input=teacher.jsonl prompt_key=prompt response_key=completion

Each record becomes prompt tokens + response tokens + <|endoftext|>. The mask (train.mask.bin,
val.mask.bin: 1 = the token is a prediction target) is 0 on the prompt, so the model learns to
answer rather than to ask, unless train_on_prompt=True; the end-of-text is a target so the
model learns to stop. Every round(1/val_fraction)-th record goes to val.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import UserError, run  # noqa: E402
from inputs import field, read_jsonl  # noqa: E402
from prepare.common import LIMITS as COMMON_LIMITS  # noqa: E402
from prepare.common import resolve_num_proc, split_every_nth, tokenizer_for, write_dataset  # noqa: E402

DEFAULTS = dict(
    input="",  # the .jsonl file: one {"prompt": ..., "response": ...} object a line
    out="data/jsonl",  # the dataset folder written
    tokenizer="gpt2",  # gpt2 (BPE, offline), char (the corpus' characters), or a tokenizer.json or its folder
    prompt_key="prompt",  # the field holding the prompt
    response_key="response",  # the field holding the response
    train_on_prompt=False,  # also learn to predict the prompt tokens (mask 1 on them)
    val_fraction=0.1,  # share of the records that validate (every round(1/val_fraction)-th)
    num_proc=0,  # tokenising processes; 0: up to 4
)
LIMITS = dict(COMMON_LIMITS, val_fraction="(0, 1)")


def read_records(path, prompt_key, response_key):
    """Good (prompt, response) pairs; bad lines are reported in one line, never dropped silently."""
    if not os.path.isfile(path):
        raise UserError(f"input={path}: file not found (a .jsonl file of {{{prompt_key!r}: ..., "
                        f"{response_key!r}: ...}} lines)")

    def pair(record):
        return field(record, prompt_key, blank_ok=True), field(record, response_key)
    records = [r for _, r in read_jsonl(path, pair, skip_bad=True)]
    if not records:
        raise UserError(f"input={path}: the file has no records")
    return records


def main(cfg):
    if not cfg["input"]:
        raise UserError("input= is required: a .jsonl file of prompt/response records")
    records = read_records(cfg["input"], cfg["prompt_key"], cfg["response_key"])
    splits, every = split_every_nth([(p, r, cfg["train_on_prompt"]) for p, r in records], cfg["val_fraction"])
    tok = tokenizer_for(cfg["tokenizer"], [p + r for p, r in records])
    write_dataset(cfg["out"], splits, tok, source=f"{len(records)} records from {cfg['input']}",
                  split_rule=f"every {every}th record to val", num_proc=resolve_num_proc(cfg["num_proc"]),
                  masked=True, extra=dict(prompt_key=cfg["prompt_key"], response_key=cfg["response_key"],
                                          train_on_prompt=cfg["train_on_prompt"]))


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
