"""OpenWebText (GPT-2's WebText, re-collected): from the Hugging Face hub, or a local copy.

    python prepare/openwebtext.py                                  # needs a network and ~55 GB
    python prepare/openwebtext.py input=owt/ out=data/owt_small    # local .txt / .jsonl files

Online, val is a seeded random 0.05% of the documents (nanoGPT's split: test_size=0.0005,
seed=2357). Locally, each .txt file is a document and each line of a .jsonl file is one (its
"text" field); every round(1/val_fraction)-th document goes to val.
"""
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import UserError, run  # noqa: E402
from prepare.common import LIMITS as COMMON_LIMITS  # noqa: E402
from prepare.common import (Column, every_nth, load_hf, resolve_num_proc, tokenizer_for,  # noqa: E402
                            write_dataset)

DEFAULTS = dict(
    input="",  # local .txt/.jsonl files or folders, comma-separated; empty: hf_dataset from the hub
    out="data/openwebtext",  # the dataset folder written
    tokenizer="gpt2",  # gpt2 (BPE, offline) or char (a vocabulary of the corpus' characters)
    val_fraction=0.0005,  # share of the documents that validate
    seed=2357,  # seed of the hub dataset's random split (nanoGPT's)
    hf_dataset="Skylion007/openwebtext",  # the hub dataset read when input is empty
    num_proc=0,  # tokenising processes; 0: up to 4
)
LIMITS = dict(COMMON_LIMITS, val_fraction="(0, 1)")


def local_files(spec):
    files = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if os.path.isdir(part):
            files += sorted(f for ext in ("txt", "jsonl")
                            for f in glob.glob(os.path.join(part, "**", f"*.{ext}"), recursive=True))
        elif os.path.isfile(part):
            files.append(part)
        else:
            raise UserError(f"input: {part!r} is neither a file nor a folder")
    return files


def read_jsonl_texts(path):
    """The "text" of every line; lines that are not JSON objects with a text are reported."""
    texts, bad = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError):
                text = None
            if isinstance(text, str) and text.strip():
                texts.append(text)
            else:
                bad.append(lineno)
    if bad:
        print(f"{path}: skipped {len(bad)} lines without a \"text\" string (lines "
              f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''})", file=sys.stderr)
    return texts


def local_documents(spec):
    docs = []
    for path in local_files(spec):
        if path.endswith(".jsonl"):
            docs += read_jsonl_texts(path)
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if text.strip():
                docs.append(text)
    if not docs:
        raise UserError(f"input={spec!r}: no documents in .txt or .jsonl files")
    return docs


def main(cfg):
    tok_name, num_proc = cfg["tokenizer"], resolve_num_proc(cfg["num_proc"])
    if cfg["input"]:
        docs = local_documents(cfg["input"])
        held, every = every_nth(len(docs), cfg["val_fraction"])
        splits = {"train": [d for i, d in enumerate(docs) if i not in held],
                  "val": [docs[i] for i in sorted(held)]}
        source, rule = f"{len(docs)} local documents from {cfg['input']}", f"every {every}th document to val"
    else:
        if tok_name == "char":
            raise UserError("tokenizer=char needs the whole corpus in memory for its vocabulary; "
                            "use tokenizer=gpt2 for OpenWebText, or a local subset with input=")
        ds = load_hf(cfg["hf_dataset"], split="train",
                     offline_hint="pass local .txt/.jsonl files with input=path/to/owt")
        parts = ds.train_test_split(test_size=cfg["val_fraction"], seed=cfg["seed"], shuffle=True)
        splits = {"train": Column(parts["train"]), "val": Column(parts["test"])}
        source = f"{cfg['hf_dataset']} (Hugging Face), {len(ds):,} documents"
        rule = f"random {cfg['val_fraction']:.2%} of documents to val (seed {cfg['seed']})"
    tok = tokenizer_for(tok_name, splits["train"] + splits["val"] if tok_name == "char" else ())
    write_dataset(cfg["out"], splits, tok, source=source, split_rule=rule, num_proc=num_proc)


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
