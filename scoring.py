"""Log-probabilities of given tokens under a model or a mixture of models, per position: the top-k
and the log of the mass outside them, and the log-probability of each position's next token. The
teacher cache stores these for every window of a dataset, and engine.prompt_logprobs (a served
prompt's `echo`) computes them the same way: a prompt scored by the server carries the very values
a cache written locally holds.
"""
import torch
import torch.nn.functional as F

from losses import TEACHER_BLOCK, default_chunk_rows


def _scores(states, heads, log_weights, rows, V, autocast):
    """(n, V) float32 scores whose softmax is the teachers' mixture on these rows: one teacher's
    logits as they are (the log-softmax is left to the caller's one normalising pass), several
    teachers' log(w_j p_j) summed in probability space."""
    if len(heads) == 1:
        with autocast():
            return F.linear(states[0][rows], heads[0][:V]).float()
    mixture = None
    for h, head, lw in zip(states, heads, log_weights):
        with autocast():
            logits = F.linear(h[rows], head[:V])
        lp = F.log_softmax(logits.float(), dim=-1).add_(lw)
        mixture = lp if mixture is None else torch.logaddexp(mixture, lp, out=mixture)
    return mixture


def _top_k_columns(z, top_k, targets):
    """(n, top_k + 1) log-probabilities of the top-k and of the rest, the (n, top_k) ids, and the
    log-probabilities of the (n,) targets (or None), from (n, V) scores (overwritten). The rest's
    log-mass comes from its own terms (log(1 - sum(top)) cancels when the top-k holds nearly all of
    it); max, exp and sum in place, not logsumexp, which on CPU took 3x as long and allocates a
    temporary the size of z."""
    chosen = None if targets is None else z.gather(1, targets[:, None])[:, 0]
    top, idx = z.topk(top_k, dim=-1, sorted=True)
    z.scatter_(1, idx, float("-inf"))
    peak = z.amax(-1, keepdim=True)
    rest = z.sub_(peak).exp_().sum(-1, keepdim=True).log_().add_(peak)
    norm = torch.logaddexp(rest, top.logsumexp(-1, keepdim=True))
    return torch.cat([top, rest], 1).sub_(norm), idx.int(), None if chosen is None else chosen - norm[:, 0]


@torch.no_grad()
def teacher_rows(hidden, heads, log_weights, x, V, top_k, autocast, targets=None):
    """The cached columns of every position of x (B, T), on x's device, rows in window-major order:
    (values (B*T, cols) float32, ids (B*T, top_k) int32 or None, log-probabilities of targets
    (B*T,) when they are given, else None). values are the T=1 log-probabilities of the teachers'
    mixture sum_j w_j p_j (one teacher: its own), top-k taken on the device. Logits are formed
    TEACHER_BLOCK loss chunks at a time, as in losses.py; on CPU each chunk is then reduced while it
    is still in cache (on CUDA the launches would cost more)."""
    with autocast():
        states = [h(x).reshape(-1, head.size(1)) for h, head in zip(hidden, heads)]
    chunk = default_chunk_rows(V)
    values, ids, chosen = [], [], []
    for i in range(0, states[0].size(0), chunk * TEACHER_BLOCK):
        scores = _scores(states, heads, log_weights, slice(i, i + chunk * TEACHER_BLOCK), V, autocast)
        offset = i
        for z in (scores,) if scores.is_cuda else scores.split(chunk):
            t = None if targets is None else targets[offset:offset + z.size(0)]
            offset += z.size(0)
            if top_k == 0:
                values.append(F.log_softmax(z, dim=-1))
                if t is not None:
                    chosen.append(values[-1].gather(1, t[:, None])[:, 0])
                continue
            v, idx, c = _top_k_columns(z, top_k, t)
            values.append(v)
            ids.append(idx)
            chosen.append(c)
    return (torch.cat(values), torch.cat(ids) if ids else None,
            torch.cat(chosen) if targets is not None else None)
