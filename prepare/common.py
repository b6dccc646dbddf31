"""What every prepare script shares: reading local files, parallel tokenisation and crash-safe
writing of a dataset.

A dataset is <out>/train.bin, val.bin (uint16 tokens, uint32 only past 65535), optional
*.mask.bin (uint8, 1 = the token is a prediction target), tokenizer.json when it was prepared
with one, and meta.json. meta.json is written last, after every other file is fsynced and
renamed into place: a folder without it is unfinished, and readers refuse it.
"""
import itertools
import json
import os
import sys
from multiprocessing import Pool

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import OUT_DIR, UserError  # noqa: E402
from tokenizer import TOKENIZER_FILE, get_tokenizer, tokenizer_from_meta  # noqa: E402

# the limits of the keys every prepare script has (configurator.describe)
LIMITS = dict(out=OUT_DIR, num_proc="[0, inf)")
_worker_tok = None
# Pool.imap reads its whole input ahead of the workers; feeding it bounded batches keeps a corpus
# larger than memory (OpenWebText is ~40 GB of text) streaming instead of piling up in a queue.
DOCS_PER_PROC_BATCH = 256


def _init_worker(info):
    global _worker_tok
    _worker_tok = tokenizer_from_meta(info)


def _encode(item):
    """item: text, or (prompt, response, train_on_prompt) for masked data -> (ids, mask or None)."""
    if isinstance(item, str):
        ids = _worker_tok.encode(item)
        return ids, None
    prompt, response, train_on_prompt = item
    p, r = _worker_tok.encode(prompt), _worker_tok.encode(response)
    return p + r, [int(train_on_prompt)] * len(p) + [1] * len(r)


def _replace_atomically(tmp, final):
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_text_atomically(path, text):
    """A kill at any moment leaves either the previous file or the new one, never a torn one."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    _replace_atomically(path + ".tmp", path)


def _encoded(items, tok, num_proc):
    """(ids, mask) per item, in input order, from num_proc processes (1 = in this process)."""
    global _worker_tok
    _worker_tok = tok
    if num_proc <= 1:
        yield from map(_encode, items)
        return
    with Pool(num_proc, _init_worker, (tok.info,)) as pool:
        it = iter(items)
        while batch := list(itertools.islice(it, DOCS_PER_PROC_BATCH * num_proc)):
            yield from pool.imap(_encode, batch, chunksize=max(1, len(batch) // (4 * num_proc)))


def _write_split(path, items, tok, dtype, num_proc, masked, desc):
    """Stream the tokens of `items` into path (+ .mask.bin); returns the token count."""
    from tqdm import tqdm

    sep = [tok.eot] if tok.eot is not None else tok.encode("\n\n")
    tmp_paths = [path + ".tmp"] + ([path.replace(".bin", ".mask.bin") + ".tmp"] if masked else [])
    files = [open(p, "wb") for p in tmp_paths]
    results = _encoded(items, tok, num_proc)
    n = 0
    try:
        for i, (ids, mask) in enumerate(tqdm(results, total=len(items), desc=desc, unit="doc")):
            if i and not masked:  # documents are separated, not terminated
                np.array(sep, dtype=dtype).tofile(files[0])
                n += len(sep)
            if masked:  # each record ends with end-of-text, which the model must learn to emit
                ids, mask = ids + sep, mask + [1] * len(sep)
                np.array(mask, dtype=np.uint8).tofile(files[1])
            np.array(ids, dtype=dtype).tofile(files[0])
            n += len(ids)
    except BaseException:
        results.close()  # stops the worker processes now, not when the traceback is freed
        for f, p in zip(files, tmp_paths):
            f.close()
            os.remove(p)  # a half-written bin is worth nothing: leave no partial files
        raise
    for f in files:
        f.close()
    for tmp in tmp_paths:
        _replace_atomically(tmp, tmp[:-len(".tmp")])
    return n


def write_dataset(out, splits, tok, source, split_rule, num_proc=1, masked=False, extra=None):
    """splits: {"train": items, "val": items}; items (anything with len() and iteration) are texts
    (documents) or, when masked, (prompt, response, train_on_prompt) triples. Returns the meta."""
    for split, items in splits.items():
        if not len(items):
            raise UserError(f"the {split} split is empty: the corpus has too few documents "
                            f"({source}); add text or change the split")
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the folder is unfinished until the new meta.json lands
    dtype = token_dtype(tok.vocab_size)
    meta = dict(tok.meta, dtype=np.dtype(dtype).name, eot=tok.eot, source=source, split=split_rule,
                has_mask=masked)
    for split, items in splits.items():
        n = _write_split(os.path.join(out, f"{split}.bin"), items, tok, dtype, num_proc, masked, split)
        if n < 2:
            raise UserError(f"the {split} split has {n} tokens; the corpus is too small")
        meta[f"{split}_tokens"] = n
    meta.update(extra or {})
    if "tokenizer_json" in tok.info:  # the data carries its tokenizer: the original may move or change
        write_text_atomically(os.path.join(out, TOKENIZER_FILE), tok.info["tokenizer_json"])
    write_text_atomically(meta_path, json.dumps(meta, indent=2))
    print(f"wrote {out}: " + ", ".join(f"{s} {meta[f'{s}_tokens']:,} tokens" for s in splits)
          + f" ({tok.name}, vocab {tok.vocab_size})")
    return meta


def token_dtype(vocab_size):
    """uint16 holds ids up to 65535 at half the disk and page cache of uint32."""
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def char_vocab(texts):
    chars = {"\n"}  # documents are separated by a blank line
    for t in texts:
        chars.update(t)
    return "".join(sorted(chars))


def tokenizer_for(name, texts):
    """The tokenizer `name`; a char vocabulary is built from every split so val has no unknowns."""
    return get_tokenizer(name, char_vocab(texts) if name == "char" else None)


def read_text(path):
    """A file's text; bytes that are not UTF-8 become U+FFFD rather than stopping a long run."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def resolve_num_proc(num_proc):
    """0 = automatic: up to 4 processes, more rarely pays for the pickling of documents."""
    return num_proc if num_proc > 0 else max(1, min(4, os.cpu_count() or 1))


def split_every_nth(items, val_fraction):
    """({"train": items, "val": items}, n): every n = round(1/val_fraction)-th item is held out,
    starting mid-stride so the first and last items (often atypical: prefaces, appendices) train."""
    every = max(2, round(1 / val_fraction))
    held = set(range(every // 2, len(items), every)) or {len(items) - 1}
    return {"train": [x for i, x in enumerate(items) if i not in held],
            "val": [items[i] for i in sorted(held)]}, every


def read_documents(files):
    """The text of every file that holds any: one document a file. Undecodable bytes become U+FFFD
    rather than stopping a large corpus at one bad file."""
    return [text for text in map(read_text, files) if text.strip()]


class Column:
    """One text column of a Hugging Face dataset, read in batches as it is iterated: a corpus
    larger than memory passes through the writer without ever being held whole."""

    def __init__(self, ds, key="text", batch_size=1000):
        self.ds, self.key, self.batch_size = ds, key, batch_size

    def __len__(self):
        return len(self.ds)

    def __iter__(self):
        for batch in self.ds.iter(batch_size=self.batch_size):
            yield from batch[self.key]
