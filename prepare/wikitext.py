"""WikiText (Wikipedia Good and Featured articles) with the dataset's own train/validation split.

    python prepare/wikitext.py config=wikitext-103-raw-v1           # needs a network
    python prepare/wikitext.py input=wikitext-103-raw/ out=data/wt103  # local wiki.{train,valid}.raw
    python prepare/wikitext.py config=wt103_saved/                    # a local copy (save_to_disk)

The test split is left alone: evaluate.py scores it. Each article (from its " = Title = " line
to the next) is a document, so GPT-2 sees <|endoftext|> between articles as it did in WebText.
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import UserError, run  # noqa: E402
from inputs import hf_dataset  # noqa: E402
from prepare.common import LIMITS as COMMON_LIMITS  # noqa: E402
from prepare.common import resolve_num_proc, tokenizer_for, write_dataset  # noqa: E402

DEFAULTS = dict(
    input="",  # a folder holding wiki.train.raw and wiki.valid.raw; empty: config from the hub
    config="wikitext-103-raw-v1",  # read when input is empty: a hub config or a save_to_disk folder
    out="data/wikitext",  # the dataset folder written
    tokenizer="gpt2",  # gpt2 (BPE, offline), char (the corpus' characters), or a tokenizer.json or its folder
    num_proc=0,  # tokenising processes; 0: up to 4
)
LIMITS = COMMON_LIMITS
SPLITS = {"train": "train", "val": "valid"}  # ours -> the file names' (HF calls it "validation")
# a top-level heading is " = Title = "; sections are " = = Section = = ", so one '=' then not '='
ARTICLE_START = re.compile(r"^(?= = [^=])", re.MULTILINE)


def articles(text):
    return [a for a in ARTICLE_START.split(text) if a.strip()]


def local_split_file(folder, split):
    for ext in ("raw", "tokens"):  # the raw release keeps the original text; .tokens has <unk>
        path = os.path.join(folder, f"wiki.{split}.{ext}")
        if os.path.isfile(path):
            return path
    raise UserError(f"input={folder}: no wiki.{split}.raw or wiki.{split}.tokens there; unzip "
                    f"WikiText (e.g. wikitext-103-raw-v1.zip) and pass its folder")


def local_texts(spec):
    folder = spec if os.path.isdir(spec) else os.path.dirname(spec)  # a file names its folder
    texts = {}
    for ours, theirs in SPLITS.items():
        with open(local_split_file(folder, theirs), encoding="utf-8") as f:
            texts[ours] = f.read()
    return texts, f"local WikiText files in {folder}"


def hub_texts(config):
    """The train and validation splits from the hub, or from a local copy when config is a folder
    (written by save_to_disk, splits named as the hub's)."""
    hint = "pass the unzipped folder holding wiki.train.raw and wiki.valid.raw with input="
    path, name = (config, None) if os.path.isdir(config) else ("wikitext", config)
    texts = {}
    for ours, theirs in (("train", "train"), ("val", "validation")):
        rows = hf_dataset(path, name, split=theirs, hint=hint, columns=("text",))["text"]
        # rows are the file's lines with their newlines, except its blank lines (" \n") which come
        # back empty: restoring them gives the raw file, so both sources make the same bins
        texts[ours] = "".join(r or " \n" for r in rows)
    local = path == config
    return texts, f"a local copy of WikiText in {config}" if local else f"wikitext/{config} (Hugging Face)"


def main(cfg):
    texts, source = local_texts(cfg["input"]) if cfg["input"] else hub_texts(cfg["config"])
    splits = {split: articles(text) for split, text in texts.items()}
    tok = tokenizer_for(cfg["tokenizer"], texts.values())
    write_dataset(cfg["out"], splits, tok, source=source,
                  split_rule="WikiText's own train / validation split, one document per article",
                  num_proc=resolve_num_proc(cfg["num_proc"]),
                  extra={f"{s}_articles": len(a) for s, a in splits.items()})


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
