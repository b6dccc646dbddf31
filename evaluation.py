"""Losses over data: sampled batches during training, every token of a split or text afterwards.

`estimate_loss` is the quick, noisy number the training loop logs at each eval; `tokens_loss`,
`split_loss` and `evaluate_model` score every target exactly once (evaluate.py, demo.py,
classify.py and the loop's final eval). `perplexity` is the one rule that turns a loss into PPL.
`own_samples_kl` scores a student against its teacher on text the student writes itself.
"""
import contextlib
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import windows
from engine import eval_mode
from inputs import hf_dataset
from losses import hard_loss, soft_loss
from onpolicy import continue_rows

# the WikiText protocol of the GPT-2 evaluation reference: windows of 1024 tokens starting 512 apart
WIKITEXT_CONTEXT, WIKITEXT_STRIDE = 1024, 512
OWN_SAMPLES_STREAM = 4  # keeps own_samples_kl's sampling seeds apart from training's streams


def perplexity(loss):
    """exp(loss); inf once exp overflows a float (loss above ~709.78), nan for a nan loss."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


@torch.no_grad()
def estimate_loss(model, data, cfg, rt, split):
    """Mean CE over eval_iters fixed batches (the same batches at every eval)."""
    model.eval()
    losses = []
    for i in range(cfg["eval_iters"]):
        x, y = data.batch(split, cfg["batch_size"], cfg["block_size"], cfg["seed"] + 1, i, 0,
                          rt.world, rt.rank)
        with rt.autocast():
            _, loss = model(x.to(rt.device), y.to(rt.device))
        losses.append(loss.item())
    model.train()
    return rt.all_mean(float(np.mean(losses)))


@torch.no_grad()
def tokens_loss(model, tokens, block_size, batch_size, device="cpu", autocast=None, stride=None,
                mask=None, progress=False):
    """Exact token-weighted CE over every target of a token array: (mean loss, tokens scored)."""
    model.eval()
    total, count = 0.0, 0
    V = model.config.vocab_size
    batches = windows(tokens, block_size, batch_size, stride, mask)
    for x, y in tqdm(batches, unit="batch", leave=False, dynamic_ncols=True, disable=not progress):
        x, y = x.to(device), y.to(device)
        with autocast or contextlib.nullcontext():
            logits, _ = model(x)
        total += F.cross_entropy(logits[..., :V].float().reshape(-1, V), y.reshape(-1),
                                 ignore_index=-1, reduction="sum").item()
        count += int((y >= 0).sum())
    return total / max(count, 1), count


def split_loss(model, data, split, block_size, batch_size, device="cpu", autocast=None, stride=None):
    return tokens_loss(model, data.tokens[split], block_size, batch_size, device, autocast, stride,
                       data.masks.get(split))


def evaluate_model(model, tokens, block_size=0, stride=0, batch_size=8, device="cpu", autocast=None,
                   mask=None, split="val", progress=False):
    """Exact mean cross-entropy of `model` over every target of `tokens`, each scored once.

    tokens: a 1-D token array, or a data.BinDataset (its `split`, with its loss mask if any).
    block_size: tokens per window, 0 = the model's own context. stride: distance between window
    starts, 0 = block_size (non-overlapping); a smaller stride gives every target after the first
    window at least block_size - stride tokens of history. autocast: a context manager or None.
    Returns dict(params, loss, ppl, tokens (targets scored), tok_s, block_size, stride).
    """
    if hasattr(tokens, "tokens"):  # a BinDataset
        tokens, mask = tokens.tokens[split], tokens.masks.get(split)
    block_size = block_size or model.config.block_size
    stride = stride or block_size
    t = time.perf_counter()
    loss, n = tokens_loss(model, tokens, block_size, batch_size, device, autocast, stride, mask, progress)
    dt = time.perf_counter() - t
    return dict(params=model.num_params(), loss=loss, ppl=perplexity(loss), tokens=n,
                tok_s=n / dt if dt > 0 else 0.0, block_size=block_size, stride=stride)


def wikitext_text(spec):
    """WikiText's test split as the raw file (wiki.test.raw) reads. spec: a config name such as
    wikitext-2-raw-v1, or a folder holding a local copy of one (written by save_to_disk)."""
    path, config = (spec, None) if os.path.isdir(spec) else ("wikitext", spec)
    rows = hf_dataset(path, config, split="test", columns=("text",),
                      hint="pass the raw test file with text=path/to/wiki.test.raw")["text"]
    # rows are the file's lines with their newlines, except its blank lines (" \n") which come back
    # empty: restoring them makes wikitext= and text=wiki.test.raw score the very same tokens
    return "".join(r or " \n" for r in rows)



@torch.no_grad()
def own_samples_kl(student, teacher, tokens, n_prompts, prompt_len, block_size, seed=0, temperature=1.0,
                   batch_size=16, device="cpu", autocast=None):
    """How far the student is from the teacher on text it writes itself (what on-policy
    distillation trains on): n_prompts prefixes of prompt_len tokens, evenly spaced over `tokens`
    (e.g. the val split), each continued by the student to block_size tokens (sampled at
    `temperature`, prefix i from a generator seeded by (seed, i)); both models then score every
    generated token's position. Returns per generated token, exact over the whole vocabulary:
    reverse_kl = KL(student || teacher), forward_kl = KL(teacher || student), and the NLL of the
    sampled tokens under each model (teacher_nll, student_nll), with the number of tokens.
    Deterministic given the seed, whatever the global RNG."""
    if not 0 < prompt_len < block_size:
        raise ValueError(f"prompt_len={prompt_len} must be between 1 and block_size - 1 = {block_size - 1}")
    starts = np.linspace(0, len(tokens) - prompt_len, n_prompts).astype(np.int64)
    V = student.config.vocab_size
    sums, count = dict(reverse_kl=0.0, forward_kl=0.0, teacher_nll=0.0, student_nll=0.0), 0
    for first in range(0, n_prompts, batch_size):
        rows = range(first, min(first + batch_size, n_prompts))
        prompts = [tokens[starts[r]:starts[r] + prompt_len].astype(np.int64).tolist() for r in rows]
        seeds = [int(np.random.SeedSequence([seed, r, OWN_SAMPLES_STREAM]).generate_state(1)[0]) for r in rows]
        x, y = continue_rows(student, prompts, block_size,
                             [torch.Generator(device).manual_seed(s) for s in seeds], temperature, autocast)
        x, y = x.to(device), y.to(device)
        with eval_mode(student), eval_mode(teacher), autocast or contextlib.nullcontext():
            s_logits, t_logits = student(x)[0], teacher(x)[0]
        n, mask = int((y >= 0).sum()), y >= 0
        for kind in ("reverse_kl", "forward_kl"):
            sums[kind] += float(soft_loss(s_logits, t_logits, kind, 1.0, mask=mask, vocab_size=V)) * n
        sums["teacher_nll"] += float(hard_loss(t_logits, y, V)) * n
        sums["student_nll"] += float(hard_loss(s_logits, y, V)) * n
        count += n
    return dict({k: v / max(count, 1) for k, v in sums.items()}, tokens=count)
