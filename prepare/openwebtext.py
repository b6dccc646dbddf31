"""OpenWebText (GPT-2's WebText, re-collected): from the Hugging Face hub, or a local copy.

    python prepare/openwebtext.py                                  # needs a network and ~55 GB
    python prepare/openwebtext.py input=owt/ out=data/owt_small    # local .txt / .jsonl files
    python prepare/openwebtext.py hf_dataset=owt_saved/            # a local copy (save_to_disk)

From the hub or a saved copy, val is a seeded random 0.05% of the documents (nanoGPT's split:
test_size=0.0005, seed=2357). From input=, each .txt file is a document and each line of a
.jsonl file is one (its "text" field); every round(1/val_fraction)-th document goes to val.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import UserError, run  # noqa: E402
from inputs import expand_files, field, hf_dataset, read_jsonl  # noqa: E402
from prepare.common import LIMITS as COMMON_LIMITS  # noqa: E402
from prepare.common import (Column, read_documents, resolve_num_proc, split_every_nth,  # noqa: E402
                            tokenizer_for, write_dataset)

DEFAULTS = dict(
    input="",  # local .txt/.jsonl files, folders or globs, comma-separated; empty: hf_dataset
    out="data/openwebtext",  # the dataset folder written
    tokenizer="gpt2",  # gpt2 (BPE, offline), char (the corpus' characters), or a tokenizer.json or its folder
    val_fraction=0.0005,  # share of the documents that validate
    seed=2357,  # seed of hf_dataset's random split (nanoGPT's)
    hf_dataset="Skylion007/openwebtext",  # read when input is empty: a hub name or a save_to_disk folder
    num_proc=0,  # tokenising processes; 0: up to 4
)
LIMITS = dict(COMMON_LIMITS, val_fraction="(0, 1)")


def local_documents(spec):
    docs = []
    for path in expand_files(spec, ("txt", "jsonl")):
        if path.endswith(".jsonl"):
            docs += [text for _, text in read_jsonl(path, _text, skip_bad=True)]
        else:
            docs += read_documents([path])
    if not docs:
        raise UserError(f"input={spec!r}: no documents in .txt or .jsonl files")
    return docs


def _text(record):
    return field(record, "text")


def main(cfg):
    tok_name, num_proc = cfg["tokenizer"], resolve_num_proc(cfg["num_proc"])
    if cfg["input"]:
        docs = local_documents(cfg["input"])
        splits, every = split_every_nth(docs, cfg["val_fraction"])
        source, rule = f"{len(docs)} local documents from {cfg['input']}", f"every {every}th document to val"
    else:
        if tok_name == "char":
            raise UserError("tokenizer=char needs the whole corpus in memory for its vocabulary; "
                            "use tokenizer=gpt2 for OpenWebText, or a local subset with input=")
        ds = hf_dataset(cfg["hf_dataset"], split="train", columns=("text",),
                        hint="pass local .txt/.jsonl files with input=path/to/owt")
        parts = ds.train_test_split(test_size=cfg["val_fraction"], seed=cfg["seed"], shuffle=True)
        splits = {"train": Column(parts["train"]), "val": Column(parts["test"])}
        source = f"{cfg['hf_dataset']} (Hugging Face), {len(ds):,} documents"
        rule = f"random {cfg['val_fraction']:.2%} of documents to val (seed {cfg['seed']})"
    tok = tokenizer_for(tok_name, splits["train"] + splits["val"] if tok_name == "char" else ())
    write_dataset(cfg["out"], splits, tok, source=source, split_rule=rule, num_proc=num_proc)


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
