"""Gradient accumulation with loss masks: one step's gradient, loss and parts do not depend on how
its global batch is split into micro-batches and ranks, however unevenly the mask counts tokens."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import trainer
from conftest import ROOT
from data import BinDataset
from runtime import Runtime
from step_grads import BLOCK, LOSSES, SEED, STEP, build, step_grads

VOCAB = 50


@pytest.fixture(scope="module")
def masked_data(tmp_path_factory):
    """Random tokens whose loss mask counts 5% to 95% of the targets, in stretches of 24 tokens:
    windows of 32 hold very different numbers of counted targets."""
    folder = tmp_path_factory.mktemp("masked")
    rng = np.random.default_rng(0)
    n = 6000
    density = np.array([0.05, 0.95, 0.3, 0.7, 0.5])[(np.arange(n) // 24) % 5]
    for split in ("train", "val"):
        rng.integers(0, VOCAB, n).astype(np.uint16).tofile(folder / f"{split}.bin")
        (rng.random(n) < density).astype(np.uint8).tofile(folder / f"{split}.mask.bin")
    (folder / "meta.json").write_text(json.dumps(dict(tokenizer="char", vocab_size=VOCAB, chars="x" * VOCAB,
                                                      dtype="uint16", has_mask=True)))
    return str(folder)


def assert_same_step(got, want):
    (g_grads, g_totals, _), (w_grads, w_totals, _) = got, want
    assert g_totals.keys() == w_totals.keys()
    for k in w_totals:
        assert abs(g_totals[k] - w_totals[k]) < 1e-6, (k, g_totals[k], w_totals[k])
    for k in w_grads:
        torch.testing.assert_close(g_grads[k], w_grads[k], atol=1e-6, rtol=0)


def test_split_of_the_global_batch_does_not_change_the_step(masked_data, tmp_path):
    """1 micro-batch x 8 rows = 4 micro-batches x 2 rows = 2 ranks x 2 micro-batches x 2 rows, for
    CE and for hybrid KD (with its cosine term): same gradient, loss and parts to 1e-6."""
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "step_grads.py"), masked_data, "2", "4", str(out)],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    data, rt = BinDataset(masked_data), Runtime(dict(device="cpu", dtype="float32"))
    for loss in LOSSES:
        one = step_grads(data, loss, 8, 1, rt)
        four = step_grads(data, loss, 2, 4, rt)
        counts = four[2]
        assert len(set(counts)) == len(counts) and max(counts) > 1.5 * min(counts), counts  # uneven
        assert sum(counts) == one[2][0]
        assert_same_step(four, one)
        assert_same_step(ddp[loss], one)
    # weighing each micro-batch's mean equally (a token by 1 / its micro-batch's count) moves the
    # gradient far beyond the tolerance above: the comparisons tell the two apart
    model, loss_fn = build("ce", VOCAB)
    cfg = dict(batch_size=2, block_size=BLOCK, gradient_accumulation_steps=4, seed=SEED)
    for x, y, _ in trainer.micro_batches(data, cfg, STEP, rt):
        (loss_fn(model, x, y)[0] / 4).backward()
    token_mean = ddp["ce"][0]
    assert max((p.grad - token_mean[n]).abs().max().item() for n, p in model.named_parameters()) > 1e-4


def test_nothing_counted_gives_zero_gradient(masked_data):
    """A step whose every target is masked out contributes a zero gradient, not NaN."""
    data, rt = BinDataset(masked_data), Runtime(dict(device="cpu", dtype="float32"))
    model, loss_fn = build("ce", VOCAB)
    x, y = data.batch("train", 2, BLOCK, 0, 0, 0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, _ = trainer.forward_backward(model, loss_fn, [(x, torch.full_like(y, -1), 1)], rt, scaler)
    assert loss == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
