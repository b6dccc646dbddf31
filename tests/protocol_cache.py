"""The model-side cache protocol driven the way an engine drives it, for tests of any family."""
import torch


class ProtocolCache:
    """Per-layer keys/values grown by concatenation, a key mask for left padding, attn_mask set
    before each forward and pos advanced after it."""

    def __init__(self, valid):
        self.valid, self.pos, self.k, self.v = valid, 0, {}, {}

    def update(self, layer, k, v):
        if layer in self.k:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def forward(self, model, idx, positions=None):
        T = idx.size(1)
        causal = torch.ones(T, self.pos + T, dtype=torch.bool).tril(self.pos)
        self.attn_mask = (causal & self.valid[:, None, :self.pos + T])[:, None]
        h = model.hidden_states(idx, self, positions)
        self.pos += T
        return h


@torch.no_grad()
def greedy(model, prompt, n):
    """prompt (B, T) continued by n argmax tokens: one prefill, then one cached token at a time."""
    cache = ProtocolCache(torch.ones(prompt.size(0), prompt.size(1) + n, dtype=torch.bool))
    idx, h = prompt, cache.forward(model, prompt)
    for _ in range(n):
        nxt = model.logits(h[:, -1])[:, :model.config.vocab_size].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
        h = cache.forward(model, nxt)
    return idx
