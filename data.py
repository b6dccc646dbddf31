"""Reading prepared datasets: data/<name>/{train,val}.bin (+ .mask.bin) described by meta.json.

Batches are a pure function of (seed, step, micro-step, rank), so a resumed run draws exactly the
windows it would have drawn, and DDP ranks split one global batch between them.
"""
import json
import os

import numpy as np
import torch

from configurator import UserError

SPLITS = ("train", "val")


class BinDataset:
    def __init__(self, data_dir):
        if not os.path.isdir(data_dir):
            raise UserError(f"data folder not found: {data_dir} (prepare it first, e.g. "
                            f"python prepare/shakespeare.py)")
        meta_path = os.path.join(data_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"{data_dir} has no meta.json: it was not prepared, or its prepare "
                            f"was interrupted; rerun the prepare script")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.dir = data_dir
        self.dtype = np.dtype(self.meta.get("dtype", "uint16"))
        self.tokens, self.masks = {}, {}
        for split in SPLITS:
            self.tokens[split] = self._memmap(f"{split}.bin", self.dtype)
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

    @property
    def tokenizer(self):
        """What a checkpoint stores to know how its tokens are spelled."""
        keep = ("tokenizer", "vocab_size", "chars")
        return {k: self.meta[k] for k in keep if k in self.meta}

    def check(self, vocab_size, block_size):
        if vocab_size != self.vocab_size:
            raise UserError(f"{self.dir}/meta.json says vocab_size={self.vocab_size} "
                            f"({self.meta.get('tokenizer')}) but the model has {vocab_size}: "
                            f"use data prepared with the model's tokenizer")
        for split in SPLITS:
            if len(self.tokens[split]) <= block_size:
                raise UserError(f"block_size={block_size} is larger than the {split} split "
                                f"({len(self.tokens[split])} tokens): lower block_size")

    def _window(self, split, starts, T):
        return _windows_at(self.tokens[split], self.masks.get(split), starts, T)

    def batch(self, split, batch_size, block_size, seed, step, micro, world_size=1, rank=0):
        """Rows micro*world+rank of the global batch of optimizer step `step` (see draw)."""
        starts = draw(len(self.tokens[split]) - block_size, split, batch_size, seed, step, micro,
                      world_size, rank)
        return self._window(split, starts, block_size)

    def windows(self, split, block_size, batch_size, stride=None):
        return windows(self.tokens[split], block_size, batch_size, stride, self.masks.get(split))


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
