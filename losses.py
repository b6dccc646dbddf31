"""Distillation losses: true divergences between teacher and student next-token distributions.

All are averaged per counted target token (the mask), never per sequence, and use only the real
vocab columns (padded logits such as 50304 vs 50257 never enter). With T the temperature, both
distributions are softmax(logits / T) and the divergence is multiplied by T^2 (Hinton et al. 2015),
which keeps the gradient scale independent of T.

  forward_kl  KL(p_t || p_s)                                   (Hinton et al. 2015)
  reverse_kl  KL(p_s || p_t), mode seeking                      (Gu et al. 2024, MiniLLM)
  jsd         b KL(p_t || m) + (1-b) KL(p_s || m), m = b p_t + (1-b) p_s
              (the generalised JSD of GKD, Agarwal et al. 2024, with P = teacher; b=0.5 is the
              symmetric JSD, bounded by log 2)

chunk_size bounds memory: the analytic gradient w.r.t. the student logits is computed chunk by
chunk in the forward pass, so float32 (rows, V) teacher and student log-probabilities exist only
for one chunk at a time, in the backward pass too.
"""
import math

import torch
import torch.nn.functional as F


def _row_divergence(log_ps, log_pt, kind, beta):
    """Per-row divergence of float32 log-probabilities (n, V) -> (n,)."""
    if kind == "forward_kl":
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if kind == "reverse_kl":
        return (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    if kind == "jsd":
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log(1 - beta))
        return (beta * (log_pt.exp() * (log_pt - log_m)).sum(-1)
                + (1 - beta) * (log_ps.exp() * (log_ps - log_m)).sum(-1))
    raise ValueError(f"unknown kd loss {kind!r}: use forward_kl, reverse_kl or jsd")


def _row_grad(log_ps, log_pt, kind, beta):
    """d divergence / d (student logits / T), per row, (n, V)."""
    ps = log_ps.exp()
    if kind == "forward_kl":
        return ps - log_pt.exp()
    if kind == "reverse_kl":
        g = log_ps - log_pt  # d/dp_s of KL(p_s||p_t) up to a constant absorbed by the softmax
    else:
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log(1 - beta))
        g = (1 - beta) * (log_ps - log_m)  # d JSD / d p_s_j; the p/m terms cancel
    # back through the softmax: dL/ds_j = p_j (g_j - sum_i p_i g_i)
    return ps * (g - (ps * g).sum(-1, keepdim=True))


def _log_probs(logits, V, T):
    return F.log_softmax(logits[:, :V].float() / T, dim=-1)


class _ChunkedSoftLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_logits, t_logits, weights, kind, T, beta, V, chunk):
        need_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(s_logits) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=s_logits.device)
        for i in range(0, s_logits.size(0), chunk):
            log_ps = _log_probs(s_logits[i:i + chunk], V, T)
            log_pt = _log_probs(t_logits[i:i + chunk], V, T)
            w = weights[i:i + chunk]
            total += (_row_divergence(log_ps, log_pt, kind, beta) * w).sum()
            if need_grad:
                # chain rule through logits / T, times the T^2 scaling: a factor T in all
                g = _row_grad(log_ps, log_pt, kind, beta) * (T * w[:, None])
                grad[i:i + chunk, :V] = g.to(grad.dtype)
        ctx.save_for_backward(grad)
        return total * T * T

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None, None, None, None


def _flatten(logits, mask):
    rows = logits.reshape(-1, logits.size(-1))
    if mask is None:
        w = torch.ones(rows.size(0), device=rows.device)
    else:
        w = mask.reshape(-1).float()
    return rows, w / w.sum().clamp(min=1.0)  # per counted token; 0 counted -> loss 0, not NaN


def soft_loss(student_logits, teacher_logits, kind="forward_kl", temperature=2.0, jsd_beta=0.5,
              mask=None, vocab_size=None, chunk_size=None):
    """Divergence between (…, V) logits, times T^2, averaged over the positions where mask is true.
    The teacher side never gets a gradient."""
    if kind == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta={jsd_beta} must be strictly between 0 and 1")
    V = vocab_size or min(student_logits.size(-1), teacher_logits.size(-1))
    s, w = _flatten(student_logits, mask)
    t = teacher_logits.reshape(-1, teacher_logits.size(-1)).detach()
    T = float(temperature)
    if chunk_size is None or chunk_size >= s.size(0):
        per_row = _row_divergence(_log_probs(s, V, T), _log_probs(t, V, T), kind, jsd_beta)
        return (per_row * w).sum() * T * T
    return _ChunkedSoftLoss.apply(s, t, w, kind, T, jsd_beta, V, int(chunk_size))


def hard_loss(logits, targets, vocab_size=None, label_smoothing=0.0):
    """Cross-entropy over the real vocab, averaged over targets >= 0 (-1 marks masked targets)."""
    V = vocab_size or logits.size(-1)
    return F.cross_entropy(logits[..., :V].reshape(-1, V), targets.reshape(-1), ignore_index=-1,
                           label_smoothing=label_smoothing)


def cosine_loss(student_hidden, teacher_hidden, mask=None):
    """DistilGPT2's cosine loss (Sanh et al. 2019): 1 - cos between last hidden states, per counted
    position. Needs equal widths."""
    if student_hidden.size(-1) != teacher_hidden.size(-1):
        raise ValueError(f"cosine loss needs equal widths, got {student_hidden.size(-1)} and "
                         f"{teacher_hidden.size(-1)}")
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.detach().float(), dim=-1)
    _, w = _flatten(cos[..., None], mask)
    return ((1 - cos.reshape(-1)) * w).sum()
