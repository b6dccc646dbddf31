"""Losses over data: sampled batches during training, every token of a split or text afterwards.

`estimate_loss` is the quick, noisy number the training loop logs at each eval; `tokens_loss`,
`split_loss` and `evaluate_model` score every target exactly once (evaluate.py, demo.py,
classify.py and the loop's final eval). `evaluate_models` runs several models over the same
windows in one pass and adds what compares a student with its teacher: KL(teacher || student) per
token, top-1 agreement, and each model's expected calibration error. `perplexity` is the one rule
that turns a loss into PPL.
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
from losses import default_chunk_rows, hard_loss, soft_loss
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
    losses = []
    with eval_mode(model):
        for i in range(cfg["eval_iters"]):
            x, y = data.batch(split, cfg["batch_size"], cfg["block_size"], cfg["seed"] + 1, i, 0,
                              rt.world, rt.rank)
            with rt.autocast():
                _, loss = model(x.to(rt.device), y.to(rt.device))
            losses.append(loss.item())
    return rt.all_mean(float(np.mean(losses)))


ECE_BINS = 15  # as Guo et al. 2017 ("On Calibration of Modern Neural Networks") report ECE


class Calibration:
    """Top-1 confidence (the model's largest next-token probability) against top-1 accuracy (that
    token is the real next one) in equal-width bins: bin k of M holds confidences in
    (k/M, (k+1)/M], and ECE = sum_k (n_k / n) |accuracy_k - confidence_k| (Guo et al. 2017, eq. 3).
    A confidence is never below 1/V, so none falls outside the first bin's open end."""

    def __init__(self, bins=ECE_BINS):
        self.bins = bins
        self.count, self.confidence, self.correct = (torch.zeros(bins, dtype=torch.float64)
                                                     for _ in range(3))

    def add(self, confidence, correct):
        """confidence: (n,) top-1 probabilities; correct: (n,) whether each top-1 was the target."""
        conf = confidence.double().cpu()
        k = (conf * self.bins).ceil().long().clamp_(1, self.bins) - 1
        self.count.index_add_(0, k, torch.ones_like(conf))
        self.confidence.index_add_(0, k, conf)
        self.correct.index_add_(0, k, correct.double().cpu())

    def ece(self):
        n = self.count.sum()
        return float((self.correct - self.confidence).abs().sum() / n) if n else math.nan

    def accuracy(self):
        n = self.count.sum()
        return float(self.correct.sum() / n) if n else math.nan

    def table(self):
        """Per bin: its upper edge, tokens, mean confidence and accuracy (None when empty), the
        data of a reliability diagram."""
        return [dict(upper=(k + 1) / self.bins, tokens=int(n),
                     confidence=float(c / n) if n else None, accuracy=float(a / n) if n else None)
                for k, (n, c, a) in enumerate(zip(self.count, self.confidence, self.correct))]


def _sync(device):
    """Wait for the device, so that a time taken around its work measures that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class _Pass:
    """What one pass accumulates for each model: summed NLL, calibration, seconds, and against the
    reference summed KL(reference || model) and top-1 agreements."""

    def __init__(self, names, bins):
        self.nll = dict.fromkeys(names, 0.0)
        self.seconds = dict.fromkeys(names, 0.0)
        self.kl = dict.fromkeys(names, 0.0)
        self.agree = dict.fromkeys(names, 0)
        self.calibration = {name: Calibration(bins) for name in names}
        self.tokens = 0


@torch.no_grad()
def score_models(models, tokens, block_size, batch_size, device="cpu", autocast=None, stride=None,
                 mask=None, reference=None, bins=ECE_BINS, progress=False):
    """Every target of a token array scored exactly once by each of `models` ({name: model}, one
    tokenizer) over the same windows. Logits are formed from the hidden states and LM head one
    chunk of rows at a time (losses.default_chunk_rows), so memory stays bounded at any vocab.
    Returns {name: dict(loss, tokens, seconds, ece, accuracy, calibration)}, and for each model
    other than `reference` (a name in models, or None) kl, the mean KL(reference || model) per
    token, and agreement, the fraction of targets where both models' top-1 tokens are equal."""
    vocab = {model.config.vocab_size for model in models.values()}
    if len(vocab) != 1:
        raise ValueError(f"models of different vocab sizes {sorted(vocab)} cannot be compared")
    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is none of the models {list(models)}")
    V = vocab.pop()
    chunk = default_chunk_rows(V)
    acc = _Pass(models, bins)
    for model in models.values():
        model.eval()
    batches = windows(tokens, block_size, batch_size, stride, mask)
    for x, y in tqdm(batches, unit="batch", leave=False, dynamic_ncols=True, disable=not progress):
        x, y = x.to(device), y.to(device)
        keep = y.reshape(-1) >= 0  # only the targets this window scores
        targets = y.reshape(-1)[keep]
        hidden = {}
        for name, model in models.items():
            t = time.perf_counter()
            with autocast or contextlib.nullcontext():
                h = model.hidden_states(x)
            hidden[name] = h.reshape(-1, h.size(-1))[keep]
            _sync(device)
            acc.seconds[name] += time.perf_counter() - t
        for i in range(0, len(targets), chunk):
            _score_chunk(models, hidden, targets[i:i + chunk], i, V, autocast, reference, acc, device)
        acc.tokens += len(targets)
    return {name: _summary(acc, name, name != reference and reference is not None) for name in models}


def _score_chunk(models, hidden, y, i, V, autocast, reference, acc, device):
    log_probs = {}
    for name, model in models.items():
        t = time.perf_counter()
        with autocast or contextlib.nullcontext():
            logits = F.linear(hidden[name][i:i + len(y)], model.head_weight[:V])
        log_p = F.log_softmax(logits.float(), dim=-1)
        top_log_p, top = log_p.max(-1)
        acc.nll[name] -= float(log_p.gather(1, y[:, None]).sum(dtype=torch.float64))
        acc.calibration[name].add(top_log_p.exp(), top == y)
        log_probs[name] = log_p, top
        _sync(device)
        acc.seconds[name] += time.perf_counter() - t
    if reference is None:
        return
    ref_log_p, ref_top = log_probs[reference]
    ref_p = ref_log_p.exp()
    for name, (log_p, top) in log_probs.items():
        if name != reference:
            acc.kl[name] += float((ref_p * (ref_log_p - log_p)).sum(dtype=torch.float64))
            acc.agree[name] += int((top == ref_top).sum())


def _summary(acc, name, compared):
    n = max(acc.tokens, 1)
    cal = acc.calibration[name]
    r = dict(loss=acc.nll[name] / n, tokens=acc.tokens, seconds=acc.seconds[name], ece=cal.ece(),
             accuracy=cal.accuracy(), calibration=cal.table())
    if compared:
        r.update(kl=acc.kl[name] / n, agreement=acc.agree[name] / n)
    return r


def tokens_loss(model, tokens, block_size, batch_size, device="cpu", autocast=None, stride=None,
                mask=None, progress=False):
    """Exact token-weighted CE over every target of a token array: (mean loss, tokens scored)."""
    r = score_models({"model": model}, tokens, block_size, batch_size, device, autocast, stride, mask,
                     progress=progress)["model"]
    return r["loss"], r["tokens"]


def split_loss(model, data, split, block_size, batch_size, device="cpu", autocast=None, stride=None):
    return tokens_loss(model, data.tokens[split], block_size, batch_size, device, autocast, stride,
                       data.masks.get(split))


def evaluate_models(models, tokens, block_size=0, stride=0, batch_size=8, device="cpu",
                    autocast=None, mask=None, split="val", reference=None, bins=ECE_BINS,
                    progress=False):
    """Exact mean cross-entropy of each of `models` ({name: model}) over every target of `tokens`,
    each scored once, all over the same windows; its ECE; and for each model but `reference` its
    KL divergence from the reference and top-1 agreement with it (see score_models).

    tokens: a 1-D token array, or a data.BinDataset (its `split`, with its loss mask if any).
    block_size: tokens per window, 0 = the smallest context of the models. stride: distance
    between window starts, 0 = block_size (non-overlapping); a smaller stride gives every target
    after the first window at least block_size - stride tokens of history. autocast: a context
    manager or None. Returns {name: dict(params, loss, ppl, tokens, tok_s, block_size, stride,
    ece, accuracy, calibration[, kl, agreement])}.
    """
    if hasattr(tokens, "tokens"):  # a BinDataset
        tokens, mask = tokens.tokens[split], tokens.masks.get(split)
    block_size = block_size or min(model.config.block_size for model in models.values())
    stride = stride or block_size
    scores = score_models(models, tokens, block_size, batch_size, device, autocast, stride, mask,
                          reference, bins, progress)
    results = {}
    for name, r in scores.items():
        loss, n, seconds = r.pop("loss"), r.pop("tokens"), r.pop("seconds")
        results[name] = dict(params=models[name].num_params(), loss=loss, ppl=perplexity(loss), tokens=n,
                             tok_s=n / seconds if seconds > 0 else 0.0, block_size=block_size,
                             stride=stride, **r)
    return results


def evaluate_model(model, tokens, block_size=0, stride=0, batch_size=8, device="cpu", autocast=None,
                   mask=None, split="val", progress=False):
    """evaluate_models for one model: dict(params, loss, ppl, tokens, tok_s, block_size, stride,
    ece, accuracy, calibration)."""
    return evaluate_models({"model": model}, tokens, block_size, stride, batch_size, device, autocast,
                           mask, split, progress=progress)["model"]


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
    chunk = default_chunk_rows(V)
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
        # chunked: no full-vocabulary temporaries beside the two models' logits
        for kind in ("reverse_kl", "forward_kl"):
            sums[kind] += float(soft_loss(s_logits, t_logits, kind, 1.0, mask=mask, vocab_size=V,
                                          chunk_rows=chunk)) * n
        sums["teacher_nll"] += float(hard_loss(t_logits, y, V, chunk_rows=chunk)) * n
        sums["student_nll"] += float(hard_loss(s_logits, y, V, chunk_rows=chunk)) * n
        count += n
    return dict({k: v / max(count, 1) for k, v in sums.items()}, tokens=count)
