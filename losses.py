"""Training losses: true divergences between teacher and student next-token distributions.

Every loss is averaged per counted target token (the mask), never per sequence, and sees only the
first `vocab_size` columns: padded logits (50304 vs 50257) never enter. With T the temperature,
both distributions are softmax(logits / T), computed in float32, and the divergence is multiplied
by T^2 so the gradient scale does not depend on T (Hinton et al. 2015, "Distilling the Knowledge
in a Neural Network", sec. 2).

  forward_kl  KL(p_t || p_s), mean seeking                     (Hinton et al. 2015)
  reverse_kl  KL(p_s || p_t), mode seeking                     (Gu et al. 2024, MiniLLM)
  jsd         b KL(p_t || m) + (1-b) KL(p_s || m), m = b p_t + (1-b) p_s
              GKD's generalised JSD (Agarwal et al. 2024, eq. for D_JSD(b)(P||Q)) with P = teacher,
              Q = student. b = 0.5 is the symmetric JSD, bounded by log 2; JSD(b)/b -> forward KL
              as b -> 0 and JSD(b)/(1-b) -> reverse KL as b -> 1, so those ends are the other two
              kinds and b must lie strictly inside (0, 1).

The loss is true divergence, not cross-entropy to the teacher (which differs by the teacher's
entropy and is never 0): forward KL is exactly 0 when the student equals the teacher.

chunk_rows bounds memory and time: (rows, V) float32 buffers of teacher and student exist for one
chunk of rows at a time (the same buffers for every chunk), in the backward pass too, because the
gradient w.r.t. the student logits is written analytically chunk by chunk during the forward pass
and only that gradient (in the student logits' dtype; over the logits themselves with
overwrite_logits) is kept for backward. The teacher may pass its final hidden states and LM head
weight instead of logits: its logits are then formed per chunk too (at V=50257 they are the
largest tensor of a distillation step). kd_loss adds the cross-entropy in the same pass and
hard_loss runs it alone the same way. On a CPU the passes over (rows, V) tensors are memory-bound
and cost as much as the model's matmuls, so a chunk forms no log-softmax: with z = logits / T
shifted by its row max, e = exp(z) and Z = sum(e), p = e / Z and log p = z - log Z, and forward KL,
its gradient and the cross-entropy come from one exp per side (a second for the student's
cross-entropy when T != 1) and a few in-place passes. Per counted row (weight w):

  forward_kl  dL/dz = p_s - p_t
  reverse_kl  dL/dz = p_s * (log p_s - log p_t - KL(p_s || p_t))
  jsd         dL/dz = (1-b) p_s * (log p_s - log m - KL(p_s || m))
  and dL/dlogits = T^2 * w * dL/dz / T = T * w * dL/dz;
  cross-entropy with label smoothing e: dL/dlogits = w * (p - (1 - e) onehot(y) - e / V).

From a teacher cache (cache_teacher.py) the teacher is known only as T=1 log-probabilities: of the
whole vocabulary (top_k=0: the loss is then exactly the online one, since tempering log-probs is
tempering logits), or of its top-k tokens plus the log of the mass outside them. The divergence is
then taken over those k + 1 buckets, between the teacher's and the student's distributions both
coarse-grained to (support, rest) and each tempered as a (k + 1)-outcome distribution,
softmax(log q / T), so it is zero when the student equals the teacher. At T = 1 it is the
divergence of the coarse-grained distributions: a lower bound on the full one (coarse-graining
never increases an f-divergence), equal to it when the two rests are proportional. At T != 1 the
rest is tempered as one outcome, which the full tempered distributions do not do: the cache does
not hold the rest's shape. _support_rows holds the gradient through the coarse-graining.
"""
import math

import torch
import torch.nn.functional as F

KINDS = ("forward_kl", "reverse_kl", "jsd")

# A chunk's (rows, V) float32 buffers stay near 16 MB: glibc serves blocks above its 32 MB mmap
# ceiling with fresh pages that fault in on first touch, on every call (the hybrid KD loss over
# 2048 rows at V=50257 on one CPU thread: 1.69 s in 500-row chunks, 1.46 s in 83-row ones).
CHUNK_ELEMENTS = 1 << 22


# 8 chunks of teacher logits (~130 MB float32) per LM head matmul: 0.92 s -> 0.66 s for the teacher
# head over 2048 rows at V=50257 on CPU, at a fraction of the 412 MB its full logits would take
TEACHER_BLOCK = 8


def default_chunk_rows(vocab_size):
    return max(1, CHUNK_ELEMENTS // vocab_size)


def _weights(mask, n, device):
    """(n,) float32 weights mask / count, so a weighted sum is the mean over counted tokens.
    With nothing counted every weight is 0 and the loss is 0 (with its graph), not NaN."""
    if mask is None:
        return torch.full((n,), 1.0 / max(n, 1), device=device)
    w = mask.reshape(-1).to(device=device, dtype=torch.float32)
    if w.numel() != n:
        raise ValueError(f"mask has {w.numel()} positions but the logits have {n}")
    return w / w.sum().clamp(min=1e-12)


def _log_probs(rows, V, T):
    z = rows[:, :V].float()
    return F.log_softmax(z if T == 1.0 else z / T, dim=-1)


def teacher_logit_chunks(t, head, V, T, chunk_rows):
    """The teacher's logits / T as float32 (rows, V) chunks the caller may overwrite: copied from
    its logits, or formed from its hidden states and LM head TEACHER_BLOCK chunks at a time,
    because a thin (chunk, C) x (C, V) matmul streams the whole head weight once per chunk (1/T
    scales the C-wide states)."""
    if head is None:
        buf = torch.empty((min(chunk_rows, t.size(0)), V), device=t.device)
        for i in range(0, t.size(0), chunk_rows):
            z = buf[:min(chunk_rows, t.size(0) - i)].copy_(t[i:i + chunk_rows, :V])
            yield z if T == 1.0 else z.mul_(1 / T)
        return
    block = chunk_rows * TEACHER_BLOCK
    # one float32 buffer for every block: a fresh one (130 MB) faults its pages in each time, which
    # made the head's matmuls 1.5x slower on CPU. Under autocast the matmul picks its own dtype.
    direct = t.dtype == head.dtype == torch.float32 and not torch.is_autocast_enabled(t.device.type)
    buf = torch.empty((min(block, t.size(0)), V), device=t.device) if direct else None
    for b in range(0, t.size(0), block):
        x = t[b:b + block] if T == 1.0 else t[b:b + block] / T
        if direct:
            logits = torch.mm(x, head[:V].t(), out=buf[:x.size(0)])
        else:
            logits = F.linear(x, head[:V]).float()
        for i in range(0, logits.size(0), chunk_rows):
            yield logits[i:i + chunk_rows]


def _divergence(log_ps, log_pt, kind, beta, with_grad=False):
    """Per-row divergence (n,) of float32 log-probabilities, and dL/dz (n, V) when with_grad
    (_chunk forms forward_kl's over the full vocabulary without log-probabilities). Overwrites
    log_pt, which the callers build for this call alone (the teacher's: no grad)."""
    if kind == "forward_kl":
        diff = log_pt - log_ps
        pt = log_pt.exp_()
        return (pt * diff).sum(-1), (log_ps.exp() - pt if with_grad else None)
    ps = log_ps.exp()
    if kind == "reverse_kl":
        g = log_ps - log_pt  # dKL/dp_s up to the +1, which the softmax Jacobian cancels
        div = (ps * g).sum(-1)
        return div, (ps * (g - div[:, None]) if with_grad else None)
    # log m via logaddexp: forming b p_t + (1-b) p_s in probability space underflows to log 0
    log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log(1 - beta))
    g = log_ps - log_m  # dJSD/dp_s = (1-b) g (+ const): the p_t/m and p_s/m terms sum to 1
    kl_s = (ps * g).sum(-1)
    div = beta * (log_pt.exp() * (log_pt - log_m)).sum(-1) + (1 - beta) * kl_s
    return div, ((1 - beta) * ps * (g - kl_s[:, None]) if with_grad else None)


def _exp_shifted(z, out):
    """z -= its row max (in place); out = exp(z); returns out's row sums, softmax's normaliser."""
    z.sub_(z.amax(-1, keepdim=True))
    return torch.exp(z, out=out).sum(-1)


def _chunk(s, zt, w, kind, T, beta, hard, z, e, p, with_grad):
    """Per-row divergence and cross-entropy of one chunk of rows, and dL/dlogits left in e when
    with_grad. s: the student's (k, V) logits; zt: the teacher's logits / T (overwritten) or None;
    z, e, p: float32 (k, V) buffers. With z = s / T shifted by its row max, e = exp(z) and
    Z = sum(e): p_s = e / Z and log p_s = z - log Z, so neither is formed as a tensor of its own."""
    m = s.amax(-1, keepdim=True).float()  # float32: bfloat16 logits are shifted in float32
    if T == 1.0:
        torch.sub(s, m, out=z)
    else:  # (s - m) / T in one pass
        torch.add(m.mul_(-1 / T), s, alpha=1 / T, out=z)
    Zs = torch.exp(z, out=e).sum(-1)
    alpha = 0.0 if hard is None else hard[1]
    a = T * (1 - alpha) * w  # dL/dlogits = T^2 w dL/dz / T, the soft loss weighted 1 - alpha
    coef = torch.zeros_like(Zs)  # dL/dlogits = coef * e + the terms added at the end
    div = nll = g = Zt = None
    if zt is not None:
        if kind == "forward_kl":
            Zt = _exp_shifted(zt, p)
            # KL = sum p_t (log p_t - log p_s) = sum p (zt - z) / Zt + log Zs - log Zt, and
            # dKL/dz = p_s - p_t = e / Zs - p / Zt
            div = zt.sub_(z).mul_(p).sum(-1) / Zt + (Zs.log() - Zt.log())
            coef += a / Zs
        else:
            log_pt = zt.sub_(torch.logsumexp(zt, -1, keepdim=True))
            div, g = _divergence(z - Zs.log()[:, None], log_pt, kind, beta, with_grad)
    b = Z1 = None
    if hard is not None:
        y, _, eps = hard
        y = y.clamp(min=0)[:, None]  # rows with target -1 carry weight 0
        # log p1 = T z - log Z1, Z1 = sum exp(T z): at T = 1 the soft loss's e and Zs serve
        y_logit = z.gather(1, y)[:, 0] * T
        mean_logit = z.mean(-1) * T if eps else 0.0
        Z1 = Zs if T == 1.0 else z.mul_(T).exp_().sum(-1)
        nll = Z1.log() - y_logit
        if eps:
            nll = (1 - eps) * nll - eps * (mean_logit - Z1.log())
        if with_grad and alpha > 0:
            # dCE/dlogits = p1 - (1 - eps) onehot(y) - eps / V
            b = alpha * w
            if T == 1.0:
                coef += b / Zs
    if with_grad:
        e.mul_(coef[:, None])
        if Zt is not None:
            e.addcmul_(p, (-a / Zt)[:, None])
        if g is not None:
            e.addcmul_(g, a[:, None])
        if b is not None:
            if T != 1.0:
                e.addcmul_(z, (b / Z1)[:, None])
            if eps:
                e.sub_((b * eps / e.size(1))[:, None])
            e.scatter_add_(1, y, (-(1 - eps) * b)[:, None])
    return div, nll


def _support_rows(s, log_pt, ids, wi, kind, T, beta, hard, z, e, with_grad):
    """_chunk against a teacher known on a support of k token ids per row plus the log of its mass
    outside them (a top-k cache): the divergence is taken over the k + 1 buckets (support, rest).
    The student's buckets are its T=1 log-probabilities gathered on the support and the log of its
    remaining mass P_rest; both sides are then tempered as (k + 1)-outcome distributions. With
    G = dL/d(buckets) and P the student's T=1 probabilities, the chain rule through the buckets
    gives dL/dz_i = G_j - P_i sum(G) on the support's j-th id i and P_i (G_rest / P_rest - sum(G))
    elsewhere (sum(G) is 0 up to rounding: kept, it is free). As in _chunk, z = s - row max,
    e = exp(z) and Z = sum(e) stand for P = e / Z and log P = z - log Z; e ends as dL/dlogits."""
    k = ids.size(1)
    torch.sub(s, s.amax(-1, keepdim=True).float(), out=z)
    e = torch.exp(z, out=e)
    e_top = e.gather(1, ids)
    # the rest's mass summed from its own terms: 1 - sum(P_top) cancels when the support holds
    # nearly all of it; tiny (not 0) if every term underflows, so its log stays finite
    rest_sum = e.scatter_(1, ids, 0.0).sum(-1)
    Z = rest_sum + e_top.sum(-1)
    log_Z = Z.log()
    rest = (rest_sum / Z).clamp_(min=torch.finfo(torch.float32).tiny)
    buckets = torch.cat([z.gather(1, ids) - log_Z[:, None], rest.log()[:, None]], 1)
    log_ps = F.log_softmax(buckets if T == 1.0 else buckets / T, dim=-1)
    div, gb = _divergence(log_ps, log_pt, kind, beta, with_grad)
    alpha, eps = (0.0, 0.0) if hard is None else hard[1:]
    nll = None
    if hard is not None:
        y = hard[0].clamp(min=0)[:, None]  # rows with target -1 carry weight 0
        nll = log_Z - z.gather(1, y)[:, 0]
        if eps:
            nll = (1 - eps) * nll - eps * (z.mean(-1) - log_Z)
    if not with_grad:
        return div, nll
    G = gb.mul_(T * (1 - alpha) * wi[:, None])
    G_sum = G.sum(-1)
    c = alpha * wi  # the cross-entropy's alpha * w (P - (1 - eps) onehot(y) - eps / V), folded in
    e.mul_(((G[:, k] / rest - G_sum + c) / Z)[:, None])  # e is 0 on the support since the scatter
    e.scatter_(1, ids, G[:, :k] + (e_top / Z[:, None]) * (c - G_sum)[:, None])
    if alpha > 0:
        if eps:
            e.sub_((eps / e.size(1)) * c[:, None])
        e.scatter_add_(1, y, ((eps - 1) * c)[:, None])
    return div, nll


def _chunked(s, t, head, w, kind, T, beta, V, chunk_rows, with_grad, hard=None, ids=None,
             overwrite=False):
    """Weighted divergence sum over rows (times T^2), one chunk of rows at a time, and its gradient
    w.r.t. the student logits. hard = (targets, alpha, eps) also sums the cross-entropy over the
    same rows and makes the gradient that of alpha * CE + (1 - alpha) * divergence; with no
    teacher (t None) the cross-entropy is all there is. With ids, t holds the teacher's T=1
    log-probabilities on those ids plus its rest (see _support_rows). overwrite: the gradient takes
    the logits' own storage, each chunk's rows once they are read."""
    n = s.size(0)
    grad = None
    if with_grad:
        # every chunk's real columns are written below; padded stay 0
        grad = s.detach() if overwrite else torch.empty_like(s)
        grad[:, V:] = 0
    # float32 buffers every chunk reuses: a fresh (rows, V) tensor per step costs a page-faulting
    # allocation that took as long as the pass filling it. A float32 gradient is written in place.
    in_place = with_grad and s.dtype == torch.float32
    z, p, e = (torch.empty((min(chunk_rows, n), V), device=s.device) if keep else None
               for keep in (True, ids is None, not in_place))
    total = torch.zeros((), dtype=torch.float32, device=s.device)
    hard_total = torch.zeros((), dtype=torch.float32, device=s.device)
    # tempering the k + 1 cached buckets is the same softmax as tempering logits
    teacher = None if t is None else teacher_logit_chunks(t, head, V if ids is None else t.size(1), T,
                                                          chunk_rows)
    for i in range(0, n, chunk_rows):
        k = min(chunk_rows, n - i)
        rows, wi = slice(i, i + k), w[i:i + k]
        out = grad[rows, :V] if in_place else None if e is None else e[:k]
        hard_i = None if hard is None else (hard[0][rows],) + hard[1:]
        zt = None if teacher is None else next(teacher)
        if ids is None:
            div, nll = _chunk(s[rows, :V], zt, wi, kind, T, beta, hard_i, z[:k], out, p[:k], with_grad)
        else:
            div, nll = _support_rows(s[rows, :V], F.log_softmax(zt, -1), ids[rows], wi, kind, T, beta,
                                     hard_i, z[:k], out, with_grad)
        if div is not None:
            total += (div * wi).sum()
        if nll is not None:
            hard_total += (nll * wi).sum()
        if with_grad and not in_place:
            grad[rows, :V] = out
    return total * (T * T), hard_total, grad


class _ChunkedKD(torch.autograd.Function):
    """A Python loop of per-chunk losses would keep every chunk's float32 intermediates alive for
    backward; this saves only the finished gradient, one tensor the size of the student logits.
    Returns the differentiable loss and, detached, the divergence and the cross-entropy."""

    @staticmethod
    def forward(ctx, s, t, head, w, kind, T, beta, V, chunk_rows, hard, ids=None, overwrite=False):
        soft, ce, grad = _chunked(s, t, head, w, kind, T, beta, V, chunk_rows, True, hard, ids,
                                  overwrite)
        ctx.save_for_backward(grad)
        loss = soft.clone() if hard is None else hard[1] * ce + (1 - hard[1]) * soft
        ctx.mark_non_differentiable(soft, ce)
        return loss, soft, ce

    @staticmethod
    def backward(ctx, grad_out, *_):
        (grad,) = ctx.saved_tensors
        # in place: a second logits-sized tensor here would undo the memory the chunking saves
        return (grad.mul_(grad_out.to(grad.dtype)),) + (None,) * 11


def _prepare(student_logits, teacher_logits, kind, temperature, jsd_beta, vocab_size, teacher_head,
             support=None):
    if kind not in KINDS:
        raise ValueError(f"unknown kd loss {kind!r}: use one of {', '.join(KINDS)}")
    if kind == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta={jsd_beta} must be strictly between 0 and 1 "
                         "(its ends are forward_kl and reverse_kl)")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    s = student_logits.reshape(-1, student_logits.size(-1))  # (B*T, Vs)
    t = teacher_logits.detach().reshape(-1, teacher_logits.size(-1))  # (B*T, Vt) or (B*T, C)
    head = None if teacher_head is None else teacher_head.detach()
    if s.size(0) != t.size(0):
        raise ValueError(f"student has {s.size(0)} positions, teacher {t.size(0)}")
    if support is not None and support.numel() != t.size(0) * (t.size(1) - 1):
        raise ValueError(f"{t.size(1)} cached columns need {t.size(1) - 1} support ids per position, "
                         f"got {tuple(support.shape)} for {t.size(0)} positions")
    Vt = s.size(1) if support is not None else t.size(1) if head is None else head.size(0)
    V = vocab_size or min(s.size(1), Vt)
    if V > min(s.size(1), Vt):
        raise ValueError(f"vocab_size={V} exceeds the logits' widths {s.size(1)}, {Vt}")
    return s, t, head, V, float(temperature)


def _rows_per_chunk(chunk_rows, n):
    """None when the whole batch is one chunk, else a validated positive row count."""
    if chunk_rows is None or chunk_rows >= n:
        return None
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows} must be a positive number of rows")
    return int(chunk_rows)


def soft_loss(student_logits, teacher_logits, kind="forward_kl", temperature=2.0, jsd_beta=0.5,
              mask=None, vocab_size=None, chunk_rows=None, teacher_head=None):
    """Divergence of (..., V) logits times T^2, averaged over positions where mask is nonzero.
    vocab_size defaults to the narrower logits; the teacher never gets a gradient. With
    teacher_head (the teacher's (V', C) LM head weight), teacher_logits are its (..., C) final
    hidden states, projected to logits one chunk at a time."""
    s, t, head, V, T = _prepare(student_logits, teacher_logits, kind, temperature, jsd_beta,
                                vocab_size, teacher_head)
    w = _weights(mask, s.size(0), s.device)
    chunk_rows = _rows_per_chunk(chunk_rows, s.size(0))
    if chunk_rows is None:
        zt = next(teacher_logit_chunks(t, head, V, T, s.size(0)))  # one chunk: all rows at once
        log_pt = F.log_softmax(zt, -1)
        div, _ = _divergence(_log_probs(s, V, T), log_pt, kind, jsd_beta)
        return (div * w).sum() * (T * T)
    if torch.is_grad_enabled() and s.requires_grad:
        return _ChunkedKD.apply(s, t, head, w, kind, T, jsd_beta, V, chunk_rows, None, None)[0]
    return _chunked(s, t, head, w, kind, T, jsd_beta, V, chunk_rows, with_grad=False)[0]


def kd_loss(student_logits, teacher_logits, targets, alpha, kind="forward_kl", temperature=2.0,
            jsd_beta=0.5, vocab_size=None, chunk_rows=None, teacher_head=None, label_smoothing=0.0,
            overwrite_logits=False):
    """alpha * CE(targets) + (1 - alpha) * soft_loss, both averaged over the targets >= 0, and the
    two parts detached for logging: (loss, hard, soft). Chunked, one pass over the rows computes
    both and keeps a single gradient, so the cross-entropy costs neither a full-vocab
    log-softmax of its own nor a second logits-sized gradient to add. overwrite_logits (chunked,
    with a graph): the gradient is written over student_logits, which the caller must not read
    again; one logits-sized tensor less per step, and none to fault in afresh."""
    s, t, head, V, T = _prepare(student_logits, teacher_logits, kind, temperature, jsd_beta,
                                vocab_size, teacher_head)
    y = targets.reshape(-1)
    mask = y >= 0
    chunk_rows = _rows_per_chunk(chunk_rows, s.size(0))
    if chunk_rows is None:
        soft = soft_loss(student_logits, teacher_logits, kind, temperature, jsd_beta, mask,
                         vocab_size, None, teacher_head)
        with torch.set_grad_enabled(torch.is_grad_enabled() and alpha > 0):
            hard = hard_loss(student_logits, targets, V, label_smoothing)
        return alpha * hard + (1 - alpha) * soft, hard.detach(), soft.detach()
    return _fused(s, t, head, y, alpha, kind, T, jsd_beta, V, chunk_rows, label_smoothing,
                  overwrite=overwrite_logits)


def _fused(s, t, head, y, alpha, kind, T, beta, V, chunk_rows, eps, ids=None, overwrite=False):
    """The chunked one-pass hybrid over the targets y >= 0: (loss, hard, soft)."""
    w = _weights(y >= 0, s.size(0), s.device)
    hard = (y, float(alpha), float(eps))
    if torch.is_grad_enabled() and s.requires_grad:
        loss, soft, ce = _ChunkedKD.apply(s, t, head, w, kind, T, beta, V, chunk_rows, hard, ids,
                                          overwrite)
        return loss, ce, soft
    soft, ce, _ = _chunked(s, t, head, w, kind, T, beta, V, chunk_rows, False, hard, ids)
    return alpha * ce + (1 - alpha) * soft, ce, soft


def cached_kd_loss(student_logits, cached, ids, targets, alpha, kind="forward_kl", temperature=2.0,
                   jsd_beta=0.5, vocab_size=None, chunk_rows=None, label_smoothing=0.0,
                   overwrite_logits=False):
    """kd_loss against a teacher cache (teacher_cache.py), whose log-probabilities were taken at
    T=1: (loss, hard, soft). With ids None, cached holds the (..., V) log-probabilities of the
    whole vocabulary, and this is kd_loss exactly, since log_softmax(log p / T) = softmax(z / T).
    Otherwise cached is (..., k + 1): the log-probabilities on the (..., k) support ids and the log
    of the mass outside them; the divergence is then between the two distributions coarse-grained
    to (support, rest), each tempered over its k + 1 buckets (see _support_rows)."""
    if ids is None:
        return kd_loss(student_logits, cached, targets, alpha, kind, temperature, jsd_beta,
                       vocab_size, chunk_rows, None, label_smoothing, overwrite_logits)
    s, t, _, V, T = _prepare(student_logits, cached, kind, temperature, jsd_beta, vocab_size, None, ids)
    ids = ids.reshape(s.size(0), -1)
    chunk_rows = _rows_per_chunk(chunk_rows, s.size(0)) or s.size(0)
    return _fused(s, t, None, targets.reshape(-1), alpha, kind, T, jsd_beta, V, chunk_rows,
                  label_smoothing, ids, overwrite_logits)


def hard_loss(logits, targets, vocab_size=None, label_smoothing=0.0, mask=None, chunk_rows=None,
              overwrite_logits=False):
    """Cross-entropy over the real vocab in float32, averaged over counted targets: targets of -1
    and positions where mask is 0 do not count. Nothing counted gives 0, not NaN. With chunk_rows
    it runs one chunk of rows at a time and keeps only its gradient for backward, which at
    V=50257 skips several passes over full-vocab tensors (overwrite_logits: see kd_loss)."""
    V = vocab_size or logits.size(-1)
    targets = targets.reshape(-1)
    if mask is not None:
        targets = targets.masked_fill(~mask.reshape(-1).bool(), -1)
    rows = logits.reshape(-1, logits.size(-1))
    chunk_rows = _rows_per_chunk(chunk_rows, rows.size(0))
    if chunk_rows is None:
        total = F.cross_entropy(rows[:, :V].float(), targets, ignore_index=-1,
                                label_smoothing=label_smoothing, reduction="sum")
        return total / (targets != -1).sum().clamp(min=1)
    w = _weights(targets >= 0, rows.size(0), rows.device)
    args = (rows, None, None, w, "forward_kl", 1.0, 0.5, V, chunk_rows)
    hard = (targets, 1.0, float(label_smoothing))
    if torch.is_grad_enabled() and rows.requires_grad:
        return _ChunkedKD.apply(*args, hard, None, overwrite_logits)[0]
    return _chunked(*args, False, hard)[1]


def cosine_loss(student_hidden, teacher_hidden, mask=None):
    """DistilGPT2's cosine embedding loss (Sanh et al. 2019, DistilBERT): 1 - cos between last
    hidden states, averaged over counted positions. Needs equal widths."""
    if student_hidden.size(-1) != teacher_hidden.size(-1):
        raise ValueError(f"cosine loss needs equal hidden widths, got student "
                         f"{student_hidden.size(-1)} and teacher {teacher_hidden.size(-1)}")
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.detach().float(), dim=-1)
    cos = cos.reshape(-1)  # (B*T,)
    return ((1 - cos) * _weights(mask, cos.numel(), cos.device)).sum()


# ---------------------------------------------------------------- the loss_fn a script hands the loop


def ce_loss_fn(vocab_size, label_smoothing=0.0, chunk_rows=0):
    """`loss_fn(model, x, y) -> (loss, {})`: cross-entropy over the targets >= 0, chunked (less
    time and memory at V=50257); chunk_rows 0 picks default_chunk_rows."""
    chunk_rows = chunk_rows or default_chunk_rows(vocab_size)

    def loss_fn(model, x, y):
        # the logits are this function's own: their storage becomes their gradient
        return hard_loss(model(x)[0], y, vocab_size, label_smoothing, chunk_rows=chunk_rows,
                         overwrite_logits=True), {}
    return loss_fn


def kd_loss_fn(teacher, vocab_size, alpha, kind="forward_kl", temperature=2.0, jsd_beta=0.5,
               label_smoothing=0.0, chunk_rows=0, alpha_cos=0.0, compile_teacher=False):
    """`loss_fn(model, x, y) -> (loss, parts)` of distillation: alpha * CE + (1 - alpha) * soft
    loss to the frozen `teacher`, plus alpha_cos * cosine loss on last hidden states; parts (hard,
    soft, cos) detached for logging. With teacher None, CE alone (output distillation)."""
    chunk_rows = chunk_rows or default_chunk_rows(vocab_size)
    if teacher is None:
        ce = ce_loss_fn(vocab_size, label_smoothing, chunk_rows)

        def hard_only(model, x, y):
            hard, _ = ce(model, x, y)
            return hard, dict(hard=hard.detach())
        return hard_only
    teacher_hidden = torch.compile(teacher.hidden_states) if compile_teacher else teacher.hidden_states
    head = teacher.head_weight

    def loss_fn(model, x, y):
        logits, _, h = model(x, return_hidden=True)
        with torch.no_grad():
            t_h = teacher_hidden(x)
        # the teacher's logits are formed chunk by chunk inside the loss, never all at once; the
        # soft loss counts exactly the targets the hard loss counts
        loss, hard, soft = kd_loss(logits, t_h, y, alpha, kind, temperature, jsd_beta, vocab_size,
                                   chunk_rows, head, label_smoothing, overwrite_logits=True)
        return with_cosine(loss, dict(hard=hard, soft=soft), alpha_cos, h, t_h, y)
    return loss_fn


def with_cosine(loss, parts, alpha_cos, h, t_h, y):
    """loss + alpha_cos * cosine_loss over the targets y >= 0 (logged as parts["cos"]), or loss."""
    if alpha_cos > 0:
        cos = cosine_loss(h, t_h, y >= 0)
        loss = loss + alpha_cos * cos
        parts["cos"] = cos.detach()
    return loss, parts


def cached_kd_loss_fn(vocab_size, alpha, kind="forward_kl", temperature=2.0, jsd_beta=0.5,
                      label_smoothing=0.0, chunk_rows=0):
    """`loss_fn(model, x, y, cached, ids=None) -> (loss, parts)` of distillation from a teacher
    cache: the batch carries the teacher's cached tensors (teacher_cache.CachedDataset), so no
    teacher runs. Parts (hard, soft) as kd_loss_fn's."""
    chunk_rows = chunk_rows or default_chunk_rows(vocab_size)

    def loss_fn(model, x, y, cached, ids=None):
        # the logits are this function's own: their storage becomes their gradient
        loss, hard, soft = cached_kd_loss(model(x)[0], cached, ids, y, alpha, kind, temperature,
                                          jsd_beta, vocab_size, chunk_rows, label_smoothing, True)
        return loss, dict(hard=hard, soft=soft)
    return loss_fn
