"""KV-cache generation apart from the model: prompts of any lengths in one batch, one prefill per
prompt with its cache copied for each sample, stop tokens, temperature, top-k, top-p, log-probs
and streaming.

    completions = engine.generate(model, [[464, 3290, 318], [40]], max_new_tokens=50, num_samples=4,
                                  temperature=0.8, top_p=0.95, stop_tokens=[50256])

The model is reached only through its cache protocol, which every family in model.py implements:
`hidden_states(idx, cache, positions)`, each attention layer's `cache.update(layer, k, v)` and
`cache.attn_mask`, and `logits(h)`.

Sampling is inverse-CDF: each row draws its uniform numbers up front, from its own generator when
given one per row, so what a row generates depends on its prompt and its numbers only, never on
the rows batched beside it (up to the rounding of batched matmuls, which can move a draw that falls
within ~1e-6 of a token boundary).
"""
import contextlib
from dataclasses import dataclass

import torch

from scoring import teacher_rows


@dataclass
class Completion:
    prompt_index: int
    sample: int
    tokens: list  # generated ids, cut before the first stop token
    finish_reason: str  # "stop" (a stop token came) or "length" (max_new_tokens reached)
    # log-probability of each of `tokens` under the model itself: temperature 1, no top-k/top-p,
    # so it describes the model (what on-policy distillation and serving need), not the sampler
    logprobs: list
    top_logprobs: list = None  # per token, the `logprobs` most likely (id, logprob) pairs


class KVCache:
    """Keys and values of every layer for up to max_T positions, allocated once, with a key mask
    `valid` (batch, max_T) that is False on left padding, so prompts of different lengths share a
    batch. Each layer's buffer takes its shape and dtype from the first keys it is handed (n_kv_head
    under grouped-query attention, autocast's dtype): nothing here depends on a model family."""

    def __init__(self, model, batch, max_T, device):
        self.batch, self.max_T = batch, max_T
        self.k = [None] * model.config.n_layer
        self.v = [None] * model.config.n_layer
        self.valid = torch.zeros(batch, max_T, dtype=torch.bool, device=device)
        self.pos = 0  # positions written
        self.attn_mask = None  # (B, 1, T, pos + T) for the forward in progress; True: may attend

    def update(self, layer, k, v):
        """Store a layer's new keys/values (B, n_kv_head, T, head_dim); all of them so far back."""
        if self.k[layer] is None:
            B, nh, T, hs = k.shape
            self.k[layer] = k.new_empty(self.batch, nh, self.max_T, hs)
            self.v[layer] = v.new_empty(self.batch, nh, self.max_T, hs)
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def forward(self, model, idx, positions, valid):
        """Hidden state (B, C) of the last of the new tokens idx (B, T) at positions (B, T);
        valid (B, T) is False on padding."""
        T = idx.size(1)
        end = self.pos + T
        self.valid[:, self.pos:end] = valid
        keys = self.valid[:, None, None, :end]
        if T == 1:  # a decoded token is never padding and comes after every key
            self.attn_mask = keys
        else:
            causal = torch.ones(T, end, dtype=torch.bool, device=idx.device).tril(self.pos)
            # padding queries attend to the padding before them: a query with no key at all gives
            # NaN, which would reach the padding's keys and values in the next layer, and NaN times
            # the zero weight of a masked key is still NaN
            self.attn_mask = causal & (keys | ~valid[:, None, :, None])
        h = model.hidden_states(idx, self, positions)
        self.pos = end
        return h[:, -1]

    def expand(self, n):
        """Repeat each row n times in place (row r becomes rows r*n ... r*n + n-1): the samples of a
        prompt continue from one prefill."""
        if n == 1:
            return

        def repeat(t):
            out = t.new_empty(t.size(0) * n, *t.shape[1:])
            out.view(t.size(0), n, *t.shape[1:]).copy_(t[:, None])
            return out
        self.k = [None if t is None else repeat(t) for t in self.k]
        self.v = [None if t is None else repeat(t) for t in self.v]
        self.valid = repeat(self.valid)
        self.batch *= n


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off for the duration, every module's own mode restored after (a training loop may
    hold some modules in eval on purpose)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def generate(model, prompts, max_new_tokens, num_samples=1, temperature=1.0, top_k=0, top_p=1.0,
             stop_tokens=(), generator=None, logprobs=0, on_token=None, stream_top=False):
    """Continue each prompt (a list of token ids, any length) num_samples times; returns one
    Completion per row, row = prompt_index * num_samples + sample, in row order.

    temperature 0 is greedy; top_k 0 and top_p 1 are off. generator: a torch.Generator, or a list of
    one per row (each row's draws then depend on its own generator only); None uses torch's global
    RNG. on_token(row, token_id, logprob) is called for every token as it is chosen, a row's stop
    token included and nothing after it; with stream_top (and logprobs > 0) it is also handed the
    token's `logprobs` most likely (id, logprob) pairs, on_token(row, token_id, logprob, top). When
    it returns True the row ends with that token (finish_reason "stop"): a server ends a row at a
    stop string or when its client has gone. A model in train mode is run in eval mode and returned
    to its modes. Past the model's context the window slides: each further token sees the last
    block_size tokens, recomputed, as a model that was never given a cache would."""
    n_rows = len(prompts) * num_samples
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    if max_new_tokens < 1 or num_samples < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and num_samples={num_samples} must be >= 1")
    if isinstance(generator, (list, tuple)) and len(generator) != n_rows:
        raise ValueError(f"{len(generator)} generators for {n_rows} rows")
    with eval_mode(model):
        return _generate(model, prompts, max_new_tokens, num_samples, temperature, top_k, top_p,
                         stop_tokens, generator, logprobs, on_token, stream_top)


def _generate(model, prompts, max_new_tokens, num_samples, temperature, top_k, top_p, stop_tokens,
              generator, n_top, on_token, stream_top):
    device = next(model.parameters()).device
    block_size, V = model.config.block_size, model.config.vocab_size
    L = max(len(p) for p in prompts)
    # every row's tokens, left-padded to L, generated tokens to the right; columns of valid tokens
    seq = torch.zeros(len(prompts), L + max_new_tokens, dtype=torch.long)
    valid = torch.zeros(len(prompts), L + max_new_tokens, dtype=torch.bool)
    for i, p in enumerate(prompts):
        seq[i, L - len(p):L] = torch.tensor(p)
        valid[i, L - len(p):] = True
    seq, valid = seq.to(device), valid.to(device)

    # the last step's token needs no forward: the cache never holds more than L + max_new_tokens - 1
    cache = KVCache(model, len(prompts), min(block_size, L + max_new_tokens - 1), device)
    h, next_pos = _prefill(model, cache, seq, valid, L)
    cache.expand(num_samples)
    seq, valid, h, next_pos = (t.repeat_interleave(num_samples, 0) for t in (seq, valid, h, next_pos))
    B = seq.size(0)

    u = None if temperature == 0 else _uniforms(generator, B, max_new_tokens, device)
    chosen_lp = torch.empty(B, max_new_tokens, device=device)
    top = (torch.empty(B, max_new_tokens, n_top, dtype=torch.long, device=device),
           torch.empty(B, max_new_tokens, n_top, device=device)) if n_top else None
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device) if stop_tokens else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    ended = [None] * B  # per row, the step count at which on_token ended it
    decoded = torch.ones(B, 1, dtype=torch.bool, device=device)  # a decoded token is never padding
    steps = 0
    for t in range(max_new_tokens):
        logits = model.logits(h)[:, :V].float()  # the padded vocab's extra columns are never drawn
        # max, not argmax, and log_softmax, not logsumexp: on a CPU each takes 1/3 and 1/2 of the
        # other's time over (32, 50257) rows (torch 2.13)
        tok = logits.max(-1).indices if u is None else sample(logits, temperature, top_k, top_p, u[:, t])
        logp = logits.log_softmax(-1)
        chosen_lp[:, t] = logp.gather(1, tok[:, None])[:, 0]
        if top is not None:
            top[1][:, t], top[0][:, t] = logp.topk(n_top, dim=-1)
        seq[:, L + t] = tok
        steps = t + 1
        if on_token is not None and _stream(on_token, tok, chosen_lp[:, t], top if stream_top else None, t, done,
                                            ended):
            done |= torch.tensor([e is not None for e in ended], device=device)
        if stop is not None:
            done |= torch.isin(tok, stop)
        if done.all():
            break
        if steps == max_new_tokens:
            break
        if cache.pos == cache.max_T:  # the window is full: slide it by recomputing
            h, next_pos = _prefill(model, cache, seq, valid, L + steps)
        else:
            h = cache.forward(model, tok[:, None], next_pos[:, None], decoded)
            next_pos += 1
    return _completions(seq[:, L:L + steps], chosen_lp[:, :steps], top, steps, num_samples, stop_tokens, ended)


def _stream(on_token, tok, lp, top, t, done, ended):
    """Hand step t's token of every live row to on_token; whether any row asked to end."""
    alts = None if top is None else [list(zip(i, v)) for i, v in zip(top[0][:, t].tolist(), top[1][:, t].tolist())]
    asked = False
    for row, (k, p, live) in enumerate(zip(tok.tolist(), lp.tolist(), (~done).tolist())):
        if live and on_token(row, k, p, *([] if alts is None else [alts[row]])) is True:
            ended[row] = t + 1
            asked = True
    return asked


def _prefill(model, cache, seq, valid, end):
    """Fill an emptied cache with the last max_T columns before `end`; the last hidden state and
    each row's next position back. Positions count a row's own tokens from 0, padding at 0."""
    start = max(0, end - cache.max_T)
    window = valid[:, start:end]
    positions = (window.cumsum(1) - 1).clamp(min=0)
    cache.pos = 0
    return cache.forward(model, seq[:, start:end], positions, window), positions[:, -1] + 1


def _uniforms(generator, B, n, device):
    """(B, n) uniform numbers in [0, 1), row b's from generator[b] when one per row is given."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.rand(n, generator=g, device=g.device).to(device) for g in generator])
    if generator is None:
        return torch.rand(B, n, device=device)
    return torch.rand(B, n, generator=generator, device=generator.device).to(device)


def sample(logits, temperature, top_k, top_p, u):
    """logits (B, V) float, u (B,) uniform in [0, 1) -> token ids (B,): the token at which the
    cumulative probability first exceeds u, the probabilities taken at `temperature` over the top_k
    (0: all) tokens, and of those the smallest most likely set whose mass reaches top_p (nucleus
    sampling, Holtzman et al. 2020)."""
    logits = logits / temperature
    ids = None
    if 0 < top_k < logits.size(-1):
        logits, ids = logits.topk(top_k, dim=-1)  # sorted, most likely first
    if top_p < 1 and ids is None:
        lse = logits.logsumexp(-1, keepdim=True)
        logits, ids = _nucleus_candidates(logits, lse, top_p)
        probs = (logits - lse).exp()
    else:
        probs = logits.softmax(dim=-1)
    if top_p < 1:
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)  # mass before it is enough
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    # u * total can round up to total, which no token's cumulative probability exceeds
    x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    j = torch.searchsorted(cdf, x, right=True)
    return (j if ids is None else ids.gather(1, j))[:, 0]


def _nucleus_candidates(logits, lse, top_p, k=256):
    """The k most likely logits and ids of each row, sorted, k grown until they hold top_p of every
    row's mass: a full sort of (32, 50257) costs more than a model step on a CPU, the top 256 of a
    trained model's distribution usually hold a 0.9 nucleus."""
    while True:
        vals, ids = logits.topk(min(k, logits.size(-1)), dim=-1)
        if k >= logits.size(-1) or bool(((vals - lse).exp().sum(-1) >= top_p).all()):
            return vals, ids
        k *= 8


def _completions(tokens, logprobs, top, steps, num_samples, stop_tokens, ended):
    stop = set(stop_tokens)
    top_ids, top_vals = (t[:, :steps].tolist() for t in top) if top is not None else (None, None)
    out = []
    for row, (toks, lps) in enumerate(zip(tokens.tolist(), logprobs.tolist())):
        n = next((k for k, tok in enumerate(toks[:ended[row]]) if tok in stop), ended[row])
        reason = "length" if n is None else "stop"
        n = len(toks) if n is None else n
        alts = None if top is None else [list(zip(i, v)) for i, v in zip(top_ids[row][:n], top_vals[row][:n])]
        out.append(Completion(row // num_samples, row % num_samples, toks[:n], reason, lps[:n], alts))
    return out


@torch.no_grad()
def prompt_logprobs(model, ids, k=0):
    """(logprobs, top_logprobs) of a prompt: the log-probability of every token after the first
    given those before it, and when k > 0 the k most likely (id, logprob) pairs at each of those
    positions (else None). Scored as cache_teacher.py scores a window (scoring.teacher_rows on one
    row: the prompt without its last token, whose own state predicts nothing here), so a prompt
    scored by a server equals a cache written locally, and block_size + 1 tokens can be scored."""
    block_size, V = model.config.block_size, model.config.vocab_size
    if not 0 < len(ids) <= block_size + 1:
        raise ValueError(f"a prompt of {len(ids)} tokens: between 1 and block_size + 1 = {block_size + 1} "
                         f"can be scored")
    if len(ids) == 1:
        return [], ([] if k else None)
    device = next(model.parameters()).device
    idx = torch.tensor(ids, dtype=torch.long, device=device)
    with eval_mode(model):
        # the autocast in force is the caller's: pass it through unchanged
        values, top, chosen = teacher_rows([model.hidden_states], [model.head_weight], [0.0], idx[None, :-1], V,
                                           max(k, 1), contextlib.nullcontext, targets=idx[1:])
    if not k:
        return chosen.tolist(), None
    return chosen.tolist(), [list(zip(i, v)) for i, v in zip(top.tolist(), values[:, :k].tolist())]
