"""One optimizer step's gradient through trainer.forward_backward, for test_accumulation.py: called
in process, or run under torchrun, where rank 0 saves what it got.

    torchrun --standalone --nproc_per_node=2 tests/step_grads.py DATA_DIR BATCH_SIZE ACCUM OUT.pt
"""
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import trainer
from data import BinDataset
from losses import ce_loss_fn, kd_loss_fn
from model import GPT, GPTConfig
from runtime import Runtime

BLOCK, SEED, STEP = 32, 5, 3
LOSSES = ("ce", "hybrid")


def build(loss, vocab_size):
    """The same student (and teacher) in every process; the KD loss chunked, with the cosine term."""
    torch.manual_seed(0)
    student = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=vocab_size))
    if loss == "ce":
        return student, ce_loss_fn(vocab_size)
    teacher = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, vocab_size=vocab_size))
    teacher.eval().requires_grad_(False)
    return student, kd_loss_fn(teacher, vocab_size, alpha=0.3, kind="jsd", temperature=2.0,
                               chunk_rows=24, alpha_cos=0.5)


def step_grads(data, loss, batch_size, accum, rt):
    """{name: gradient}, the step's loss and parts (token-weighted, summed over ranks), and the
    counted targets of each of this rank's micro-batches."""
    model, loss_fn = build(loss, data.vocab_size)
    cfg = dict(batch_size=batch_size, block_size=BLOCK, gradient_accumulation_steps=accum, seed=SEED)
    batches = trainer.micro_batches(data, cfg, STEP, rt)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    value, parts = trainer.forward_backward(DDP(model) if rt.ddp else model, loss_fn, batches, rt, scaler)
    sums = rt.all_sum(value, *parts.values())
    totals = dict(zip(["loss", *parts], sums if parts else [sums]))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return grads, totals, [int((y >= 0).sum()) for _, y, _ in batches]


if __name__ == "__main__":
    data_dir, batch_size, accum, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    rt = Runtime(dict(device="cpu", dtype="float32"))
    try:
        got = {loss: step_grads(BinDataset(data_dir), loss, batch_size, accum, rt) for loss in LOSSES}
        if rt.master:
            torch.save(got, out)
    finally:
        rt.close()
