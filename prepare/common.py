"""What every prepare script shares: parallel tokenisation and crash-safe writing of a dataset.

A dataset is <out>/train.bin, val.bin (uint16 tokens, uint32 only past 65535), optional
*.mask.bin (uint8, 1 = the token is a prediction target) and meta.json. meta.json is written
last, after every bin is fsynced and renamed into place: a folder without it is unfinished, and
readers refuse it.
"""
import json
import os
import sys
from multiprocessing import Pool

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import UserError  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

_worker_tok = None


def _init_worker(name, chars):
    global _worker_tok
    _worker_tok = get_tokenizer(name, chars)


def _encode(item):
    """item: text, or (prompt, response) pairs for masked data -> (ids, mask or None)."""
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


def _write_split(path, items, tok, dtype, num_proc, masked, desc):
    """Stream the tokens of `items` into path (+ .mask.bin); returns the token count."""
    from tqdm import tqdm

    sep = [tok.eot] if tok.eot is not None else tok.encode("\n\n")
    tmp_paths = [path + ".tmp"] + ([path.replace(".bin", ".mask.bin") + ".tmp"] if masked else [])
    files = [open(p, "wb") for p in tmp_paths]
    n = 0
    try:
        if num_proc > 1:
            pool = Pool(num_proc, _init_worker, (tok.name, getattr(tok, "chars", None)))
            results = pool.imap(_encode, items, chunksize=16)
        else:
            _init_worker(tok.name, getattr(tok, "chars", None))
            pool, results = None, map(_encode, items)
        for i, (ids, mask) in enumerate(tqdm(results, total=len(items), desc=desc, unit="doc")):
            if i and not masked:  # documents are separated, not terminated
                np.array(sep, dtype=dtype).tofile(files[0])
                n += len(sep)
            if masked:  # each record ends with end-of-text, which the model must learn to emit
                ids, mask = ids + sep, mask + [1] * len(sep)
                np.array(mask, dtype=np.uint8).tofile(files[1])
            np.array(ids, dtype=dtype).tofile(files[0])
            n += len(ids)
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        for f in files:
            f.close()
    for tmp in tmp_paths:
        _replace_atomically(tmp, tmp[:-len(".tmp")])
    return n


def write_dataset(out, splits, tok, source, split_rule, num_proc=1, masked=False, extra=None):
    """splits: {"train": items, "val": items}; items are texts (documents) or, when masked,
    (prompt, response, train_on_prompt) triples. Returns the meta dict."""
    for split, items in splits.items():
        if not items:
            raise UserError(f"the {split} split is empty: the corpus has too few documents "
                            f"({source}); add text or change the split")
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the folder is unfinished until the new meta.json lands
    dtype = np.uint16 if tok.vocab_size <= 2 ** 16 else np.uint32
    meta = dict(tokenizer=tok.name, vocab_size=tok.vocab_size, dtype=np.dtype(dtype).name,
                eot=tok.eot, source=source, split=split_rule, has_mask=masked)
    if tok.name == "char":
        meta["chars"] = tok.chars
    for split, items in splits.items():
        n = _write_split(os.path.join(out, f"{split}.bin"), items, tok, dtype, num_proc, masked, split)
        if n < 2:
            raise UserError(f"the {split} split has {n} tokens; the corpus is too small")
        meta[f"{split}_tokens"] = n
    meta.update(extra or {})
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    _replace_atomically(meta_path + ".tmp", meta_path)
    print(f"wrote {out}: " + ", ".join(f"{s} {meta[f'{s}_tokens']:,} tokens" for s in splits)
          + f" ({tok.name}, vocab {tok.vocab_size})")
    return meta


def char_vocab(texts):
    chars = {"\n"}  # documents are separated by a blank line
    for t in texts:
        chars.update(t)
    return "".join(sorted(chars))


def default_num_proc():
    return max(1, min(8, (os.cpu_count() or 1)))
