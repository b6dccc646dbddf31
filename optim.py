"""AdamW with per-depth learning rates, the warmup + decay schedule, freezing, and one optimizer step.

The training loop, the classifier's fine-tuning and the benchmark all step through
`apply_gradients()`, so unscaling, clipping and skipping a non-finite update happen the same way
everywhere.
"""
import math

import torch

from configurator import UserError

DECAYS = ("cosine", "linear", "constant")


def lr_at(step, cfg):
    """Linear warmup, then cosine or linear decay to min_lr at lr_decay_iters (default max_iters)."""
    lr, warmup = cfg["learning_rate"], cfg["warmup_iters"]
    end = cfg["lr_decay_iters"] or cfg["max_iters"]
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if cfg["decay"] == "constant" or step >= end:
        return lr if cfg["decay"] == "constant" else cfg["min_lr"]
    progress = (step - warmup) / max(1, end - warmup)
    if cfg["decay"] == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg["min_lr"] + coeff * (lr - cfg["min_lr"])


def freeze(model, n_blocks):
    """Freeze the embeddings and the first n_blocks blocks (a head tied to the embedding with them)."""
    if n_blocks <= 0:
        return
    for name, p in model.named_parameters():
        if model.depth_of(name) <= n_blocks:
            p.requires_grad_(False)


def make_optimizer(model, cfg, device_type):
    """AdamW; weight decay on matrices only (not biases, LayerNorms); with layer_lr_decay < 1 each
    depth gets lr * decay^(n_layer + 1 - depth) (Howard & Ruder 2018; Clark et al. 2020)."""
    n = model.config.n_layer
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2
        depth = model.depth_of(name) if cfg["layer_lr_decay"] != 1.0 else n + 1
        key = (depth, decay)
        if key not in groups:
            groups[key] = dict(params=[], weight_decay=cfg["weight_decay"] if decay else 0.0,
                               lr_scale=cfg["layer_lr_decay"] ** (n + 1 - depth), depth=depth)
        groups[key]["params"].append(p)
    if not groups:
        raise UserError("no trainable parameters (check freeze_layers / lora settings)")
    # fused AdamW has CUDA and CPU kernels: one pass per tensor instead of ~8 (6x384 on CPU: the
    # optimizer step goes from 1.73 s to 0.60 s)
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(list(groups.values()), lr=cfg["learning_rate"],
                             betas=(cfg["beta1"], cfg["beta2"]), fused=fused)


def apply_gradients(optimizer, scaler, params, lr, grad_clip, finite=True):
    """Apply the accumulated (scaled) gradients at learning rate lr: unscale, clip their norm to
    grad_clip (0: measure only), step unless `finite` is False or the norm is not finite, update
    the scaler, zero the gradients. Returns (gradient norm, whether the update was applied)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    applied = finite and bool(torch.isfinite(norm))
    if applied:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(norm), applied
