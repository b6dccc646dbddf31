"""BabyLM (child-scale English: 10M or 100M words from six sources), split as the reference
BabyLM distillation project does.

    python prepare/babylm.py input=train_10M/ out=data/babylm        # the six .train files
    python prepare/babylm.py                                          # from the hub; needs a network
    python prepare/babylm.py hf_dataset=babylm_saved/                 # a local copy (save_to_disk)

The .train files (bnc_spoken, childes, gutenberg, open_subtitles, simple_wiki, switchboard) are
merged in file-name order keeping each file's line order (dialogue stays coherent), then the
first 95% of lines train and the last 5% validate. Each file's share of a split is one document.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import UserError, run  # noqa: E402
from inputs import expand_files, hf_dataset  # noqa: E402
from prepare.common import LIMITS as COMMON_LIMITS  # noqa: E402
from prepare.common import resolve_num_proc, tokenizer_for, write_dataset  # noqa: E402

DEFAULTS = dict(
    input="",  # the six .train files: their folder (e.g. train_10M/), files or globs; empty: hf_dataset
    out="data/babylm",  # the dataset folder written
    tokenizer="gpt2",  # gpt2 (BPE, offline), char (the corpus' characters), or a tokenizer.json or its folder
    val_fraction=0.05,  # share of the merged lines, taken from the end, that validate
    hf_dataset="AlienKevin/BabyLM_2024_10M",  # read when input is empty: a hub name or a save_to_disk folder
    num_proc=0,  # tokenising processes; 0: up to 4
)
LIMITS = dict(COMMON_LIMITS, val_fraction="(0, 1)")


def local_sources(spec):
    files = expand_files(spec, ("train",))
    if not files:
        raise UserError(f"input={spec}: no .train files there (expected bnc_spoken.train, "
                        f"childes.train, ...)")
    sources = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            sources.append((os.path.basename(path), f.readlines()))
    return sources


def hub_sources(name):
    ds = hf_dataset(name, split="train", columns=("text",),
                    hint="pass the folder of .train files with input=train_10M/")
    return [(name, [t if t.endswith("\n") else (t or "") + "\n" for t in ds["text"]])]


def split_lines(sources, val_fraction):
    """sources: [(name, lines)] in merge order. The first 1 - val_fraction of all lines train."""
    cut = int(sum(len(lines) for _, lines in sources) * (1 - val_fraction))
    splits, val_sources, pos = {"train": [], "val": []}, [], 0
    for name, lines in sources:
        head, tail = lines[:max(0, cut - pos)], lines[max(0, cut - pos):]
        if "".join(head).strip():
            splits["train"].append("".join(head))
        if "".join(tail).strip():
            splits["val"].append("".join(tail))
            val_sources.append(name)
        pos += len(lines)
    return splits, val_sources


def main(cfg):
    sources = local_sources(cfg["input"]) if cfg["input"] else hub_sources(cfg["hf_dataset"])
    splits, val_sources = split_lines(sources, cfg["val_fraction"])
    tok = tokenizer_for(cfg["tokenizer"], splits["train"] + splits["val"])
    n_lines = sum(len(lines) for _, lines in sources)
    write_dataset(cfg["out"], splits, tok,
                  source=f"BabyLM from {cfg['input'] or cfg['hf_dataset']}: {n_lines:,} lines",
                  split_rule=f"files merged in name order, first {1 - cfg['val_fraction']:.0%} of "
                             f"lines train, last {cfg['val_fraction']:.0%} val",
                  num_proc=resolve_num_proc(cfg["num_proc"]),
                  extra=dict(files=[name for name, _ in sources], val_sources=val_sources))


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
