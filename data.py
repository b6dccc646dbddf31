"""Reading prepared datasets: data/<name>/{train,val}.bin (+ .mask.bin) described by meta.json.

Batches are a pure function of (seed, step, micro-step, rank), so a resumed run draws exactly the
windows it would have drawn, and DDP ranks split one global batch between them.
"""
import functools
import json
import os

import numpy as np
import torch

from configurator import UserError, first_line
from tokenizer import RECORD_KEYS, TOKENIZER_FILE, vocab_sha256

SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")  # what prepare/ writes: uint32 only when the vocab passes 65536


class BinDataset:
    """A prepared dataset. train_windows=N: training rows are drawn among the first N windows at
    multiples of block_size (those a teacher cache of N windows holds), so a CE run and a cached
    distillation with one seed see the very same rows; 0: a row may start at any token."""

    def __init__(self, data_dir, train_windows=0):
        if os.path.isfile(data_dir):
            raise UserError(f"{data_dir} is a file; a dataset is the folder a prepare/ script writes "
                            f"(train.bin, val.bin, meta.json)")
        if not os.path.isdir(data_dir):
            raise UserError(f"data folder not found: {data_dir} (prepare it first, e.g. "
                            f"python prepare/shakespeare.py)")
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"{data_dir} has no meta.json: it was not prepared, or its prepare "
                            f"was interrupted; rerun the prepare script")
        self.meta = _read_meta(meta_path)
        self.dir = data_dir
        self.train_windows = train_windows
        self.dtype = np.dtype(self.meta.get("dtype", "uint16"))
        self.tokens, self.masks = {}, {}
        for split in SPLITS:
            self.tokens[split] = self._memmap(f"{split}.bin", self.dtype)
            held = len(self.tokens[split])
            if self.meta.get(f"{split}_tokens", held) != held:
                raise UserError(f"{meta_path} says {split}_tokens={self.meta[f'{split}_tokens']} but "
                                f"{split}.bin holds {held} tokens (an interrupted or mixed prepare); re-prepare")
            if self.meta.get("has_mask"):
                self.masks[split] = self._memmap(f"{split}.mask.bin", np.dtype(np.uint8))
                if len(self.masks[split]) != len(self.tokens[split]):
                    raise UserError(f"{data_dir}/{split}.mask.bin has {len(self.masks[split])} "
                                    f"entries for {len(self.tokens[split])} tokens; re-prepare")

    def _memmap(self, name, dtype):
        path = os.path.join(self.dir, name)
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing; rerun the prepare script")
        size = os.path.getsize(path)
        if size % dtype.itemsize:
            raise UserError(f"{path} is {size} bytes, not a whole number of {dtype.name} tokens "
                            f"(truncated or written with another dtype); re-prepare")
        if size == 0:
            raise UserError(f"{path} is empty; the corpus produced no tokens for this split")
        return np.memmap(path, dtype=dtype, mode="r")

    @property
    def vocab_size(self):
        return int(self.meta["vocab_size"])

    @functools.cached_property
    def tokenizer(self):
        """What a checkpoint stores to know how its tokens are spelled: meta.json's record, plus
        the text of a tokenizer.json (kept beside the bins by prepare/) so no file is needed later."""
        info = {k: self.meta[k] for k in RECORD_KEYS if k in self.meta}
        if "vocab_sha256" in info:
            path = os.path.join(self.dir, TOKENIZER_FILE)
            if not os.path.isfile(path):
                raise UserError(f"{path} is missing: {self.dir} was prepared with a tokenizer.json "
                                f"whose copy belongs there; re-prepare")
            with open(path, encoding="utf-8") as f:
                info["tokenizer_json"] = f.read()
            if vocab_sha256(info["tokenizer_json"]) != info["vocab_sha256"]:
                raise UserError(f"{path} is not the tokenizer {self.dir} was prepared with (its sha256 "
                                f"differs from meta.json's); re-prepare")
        return info

    def check(self, vocab_size, block_size):
        if vocab_size != self.vocab_size:
            raise UserError(f"{self.dir}/meta.json says vocab_size={self.vocab_size} "
                            f"({self.meta.get('tokenizer')}) but the model has {vocab_size}: "
                            f"use data prepared with the model's tokenizer")
        for split in SPLITS:
            if len(self.tokens[split]) <= block_size:
                raise UserError(f"block_size={block_size} is larger than the {split} split "
                                f"({len(self.tokens[split])} tokens): lower block_size")
        held = self.windows_of(block_size)
        if self.train_windows > held:
            raise UserError(f"train_windows={self.train_windows} exceeds the {held} windows of "
                            f"block_size={block_size} in {self.dir}'s train split: lower it")

    def windows_of(self, block_size):
        """Whole windows of block_size (and their next-token targets) in the train split."""
        return (len(self.tokens["train"]) - 1) // block_size

    def _window(self, split, starts, T):
        return _windows_at(self.tokens[split], self.masks.get(split), starts, T)

    def drawn_windows(self, batch_size, seed, step, micro, world_size=1, rank=0):
        """Indices among the first train_windows windows of a training micro-batch (see draw)."""
        return draw(self.train_windows, "train", batch_size, seed, step, micro, world_size, rank)

    def batch(self, split, batch_size, block_size, seed, step, micro, world_size=1, rank=0):
        """Rows micro*world+rank of the global batch of optimizer step `step` (see draw)."""
        if split == "train" and self.train_windows:
            starts = self.drawn_windows(batch_size, seed, step, micro, world_size, rank)
            return self._window(split, starts * block_size, block_size)
        starts = draw(len(self.tokens[split]) - block_size, split, batch_size, seed, step, micro,
                      world_size, rank)
        return self._window(split, starts, block_size)


def _read_meta(path):
    """meta.json, checked for what reading the bins relies on; the first thing wrong is one line."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or absurdly nested
        raise UserError(f"{path} is not valid JSON ({first_line(e)}); re-prepare the dataset") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} holds a JSON {type(meta).__name__}, not an object; re-prepare the dataset")
    dtype, vocab = meta.get("dtype", "uint16"), meta.get("vocab_size")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UserError(f"{path}: dtype={dtype!r}, expected one of {', '.join(DTYPES)}; re-prepare the dataset")
    if not _is_int(vocab) or not 0 < vocab <= np.iinfo(dtype).max + 1:
        raise UserError(f"{path}: vocab_size={vocab!r} must be a whole number from 1 to "
                        f"{np.iinfo(dtype).max + 1} ({dtype} tokens); re-prepare the dataset")
    if not isinstance(meta.get("has_mask", False), bool):
        raise UserError(f"{path}: has_mask={meta['has_mask']!r} must be true or false; re-prepare the dataset")
    for key in (f"{split}_tokens" for split in SPLITS):
        if key in meta and not _is_int(meta[key]):
            raise UserError(f"{path}: {key}={meta[key]!r} must be a whole number; re-prepare the dataset")
    return meta


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def draw(high, split, batch_size, seed, step, micro, world_size=1, rank=0):
    """batch_size integers in [0, high): rows micro*world+rank of the global batch of optimizer step
    `step`. The global batch is the same whatever the world size, so 2 ranks x 1 micro-step =
    1 rank x 2 micro-steps."""
    rows = batch_size * (micro * world_size + rank + 1)
    rng = np.random.default_rng([seed, step, 0 if split == "train" else 1])
    return rng.integers(0, high, size=rows)[-batch_size:]


def _windows_at(tokens, mask, starts, T):
    x = np.stack([tokens[s:s + T] for s in starts]).astype(np.int64)
    y = np.stack([tokens[s + 1:s + 1 + T] for s in starts]).astype(np.int64)
    if mask is not None:
        m = np.stack([mask[s + 1:s + 1 + T] for s in starts])
        y[m == 0] = -1  # -1 targets are ignored by every loss
    return torch.from_numpy(x), torch.from_numpy(y)


class windows:
    """Every target of a 1-D token array scored exactly once, as batches of (x, y) windows of
    block_size (len() = number of batches). Consecutive windows start `stride` apart, so each
    target after the first window is predicted with at least block_size - stride tokens of
    history; y = -1 where an earlier window already scored the target (or the mask excludes it)."""

    def __init__(self, tokens, block_size, batch_size, stride=None, mask=None):
        stride = block_size if stride is None else stride
        if not 0 < stride <= block_size:
            raise UserError(f"stride={stride} must be between 1 and the context {block_size}")
        self.tokens, self.mask, self.batch_size = tokens, mask, batch_size
        n = len(tokens) - 1  # targets
        self.T = min(block_size, n)
        self.starts, self.skips = [], []
        pos = 0  # first target not yet scored
        while pos < n:
            s = max(0, min(pos - (self.T - stride), n - self.T))
            self.starts.append(s)
            self.skips.append(pos - s)
            pos = s + self.T

    def __len__(self):
        return -(-len(self.starts) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.starts), self.batch_size):
            x, y = _windows_at(self.tokens, self.mask, self.starts[i:i + self.batch_size], self.T)
            for r, skip in enumerate(self.skips[i:i + self.batch_size]):
                y[r, :skip] = -1
            yield x, y
