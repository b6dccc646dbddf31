"""One decoder-only transformer, its family chosen by config: GPT-2 or Llama.

GPT-2 (Radford et al. 2019): learned absolute positions, pre-LayerNorm blocks, GELU (tanh
approximation, "gelu_new") and an LM head tied to the token embedding.
Llama (Touvron et al. 2023): rotary positions (Su et al. 2021) in HF's rotate-half layout,
RMSNorm, a SwiGLU MLP (Shazeer 2020), grouped-query attention (Ainslie et al. 2023), no biases
and, as a rule, an untied head. Qwen2 is Llama with biases on q, k and v.

Both share one module layout (transformer.wte/h/ln_f, attn.c_attn = q|k|v, mlp.c_fc, c_proj,
lm_head), so the rest of the code asks the model, never a family, for what it needs: its
`blocks`, `depth_of` a parameter, `lora_targets`, its output head (`logits`, `head_weight`),
`num_params`, `flops_per_token`, and `init_from_layers` of a deeper teacher. Generation is
engine.py's, through the cache protocol every family keeps: `hidden_states(idx, cache, positions)`,
each attention layer's `cache.update(layer, k, v)` and `cache.attn_mask`. HF folders in and out
are hf.py's.
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from configurator import UserError


@dataclass
class GPTConfig:
    family: str = "gpt2"  # a key of FAMILIES: the norm, MLP and positions of the blocks
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257  # the tokenizer's vocab; the embedding may be padded beyond it
    pad_vocab_to: int = 64  # 50257 -> 50304 keeps matmuls on fast tile sizes; 1 for HF weights
    bias: bool = True  # biases in every linear and LayerNorm (HF Llama: attention_bias, mlp_bias)
    dropout: float = 0.0
    n_kv_head: int = 0  # key/value heads, fewer than n_head for grouped-query attention; 0: n_head
    intermediate_size: int = 0  # MLP width; 0: the family's default
    rope_theta: float = 10000.0  # base of the rotary frequencies (Llama 2: 1e4, CodeLlama: 1e6)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # the LM head is the token embedding
    qkv_bias: bool = False  # biases on q, k and v even without bias (Qwen2)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UserError(f"family={self.family!r}: use one of {', '.join(FAMILIES)}")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.intermediate_size = self.intermediate_size or FAMILIES[self.family].mlp_width(self.n_embd)
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}")
        if FAMILIES[self.family].rope and self.head_dim % 2:
            raise UserError(f"rotary positions need an even head size, not n_embd/n_head={self.head_dim}")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self):
        return math.ceil(self.vocab_size / self.pad_vocab_to) * self.pad_vocab_to

    @classmethod
    def from_dict(cls, d):
        """A recorded config; one written before families were recorded is GPT-2's, whose new
        fields' defaults are what it always was."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self):
        return asdict(self)


# the released sizes (Radford et al. 2019, table 2)
GPT2_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def rope_tables(positions, head_dim, theta):
    """cos, sin (..., T, head_dim) of the rotary angles at these positions; float32 as HF makes
    them: in bfloat16, positions in the thousands would round to the same angle."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half pairs dimension i with i + head_dim/2
    if positions.dim() == 2:  # (B, T) -> (B, 1, T, head_dim), one row of angles per batch row
        angles = angles[:, None]
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.layer = layer  # the cache keeps keys and values per layer
        kv = 2 * config.n_kv_head * config.head_dim
        # q, k and v in one matmul; with fewer k/v heads each serves n_head / n_kv_head queries
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + kv, bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache=None):
        B, T, C = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([C, kv, kv], dim=2)
        # (B, T, heads * hs) -> (B, heads, T, hs)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        gqa = self.n_kv_head != self.n_head
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # the cache's owner says which earlier keys each query may see (padding, causality)
            k, v = cache.update(self.layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.attn_mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's: a GELU between two linears."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class SwiGLU(nn.Module):
    """Llama's: silu(gate) * up, then down; gate and up in one matmul (c_fc)."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=config.bias)
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


@dataclass(frozen=True)
class Family:
    norm: Callable  # config -> the norm module before attention, before the MLP and at the end
    mlp: Callable  # config -> the MLP module
    rope: bool  # rotary positions; otherwise a learned table of block_size positions
    mlp_width: Callable  # n_embd -> the default intermediate size


FAMILIES = {
    "gpt2": Family(norm=lambda c: nn.LayerNorm(c.n_embd, eps=c.norm_eps, bias=c.bias), mlp=MLP,
                   rope=False, mlp_width=lambda C: 4 * C),
    # Llama's 2/3 of 4C keeps the SwiGLU's three matrices at the cost of GELU's two, rounded up to
    # a multiple of 256 as Meta's reference code does (4096 -> 11008)
    "llama": Family(norm=lambda c: nn.RMSNorm(c.n_embd, eps=c.norm_eps), mlp=SwiGLU,
                    rope=True, mlp_width=lambda C: 256 * math.ceil(8 * C / 3 / 256)),
}


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        family = FAMILIES[config.family]
        self.ln_1 = family.norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = family.norm(config)
        self.mlp = family.mlp(config)

    def forward(self, x, rope=None, cache=None):
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    # LoRA's names for the linears of a block: q|k|v, the attention output, the MLP's input
    # (Llama: gate|up) and its output (Llama: down)
    lora_targets = {"attn": "attn.c_attn", "attn_proj": "attn.c_proj", "mlp": "mlp.c_fc", "mlp_proj": "mlp.c_proj"}

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        family = FAMILIES[config.family]
        modules = dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd))
        if not family.rope:
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(drop=nn.Dropout(config.dropout),
                       h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                       ln_f=family.norm(config))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.tie()
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): two per block add to the stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def tie(self):
        """Make the LM head the token embedding (Press & Wolf 2017) when the config ties them; called
        again whenever the parameters are replaced, as loading onto empty tensors does."""
        if self.config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------- what the rest of the code asks

    @property
    def blocks(self):
        return self.transformer.h

    @property
    def head_weight(self):
        """The output head (padded V, C): logits = hidden states @ head_weight.T."""
        return self.lm_head.weight

    def depth_of(self, name):
        """Depth of a parameter for freezing and layer-wise LR: embeddings 0, block i -> i + 1, the
        final norm and an untied head n_layer + 1."""
        parts = name.split(".")
        if "h" in parts:
            return int(parts[parts.index("h") + 1]) + 1
        return 0 if "wte" in parts or "wpe" in parts else self.config.n_layer + 1

    def num_params(self, non_embedding=False):
        """Parameters; non_embedding leaves out the tables that are looked up rather than multiplied:
        the positions, and the token embedding when the head is a matrix of its own."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for name, p in self.transformer.named_parameters()
                     if name == "wpe.weight" or name == "wte.weight" and not self.config.tie_embeddings)
        return n

    def flops_per_token(self, T=None):
        """Training FLOPs per token, 6N + 12·L·C·T (Kaplan et al. 2020; PaLM appendix B): the
        matmuls' forward+backward plus attention scores over the context."""
        cfg = self.config
        T = cfg.block_size if T is None else T
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T

    def block_shape(self):
        """What a block's weights must agree on to be copied between two models."""
        c = self.config
        return dict(family=c.family, n_embd=c.n_embd, n_head=c.n_head, n_kv_head=c.n_kv_head,
                    intermediate_size=c.intermediate_size, bias=c.bias, qkv_bias=c.qkv_bias)

    @torch.no_grad()
    def init_from_layers(self, teacher, layers):
        """Start as a shallower copy of `teacher`: its embeddings, final norm and head, and its
        blocks `layers` as ours, in order (DistilGPT2's initialisation, Sanh et al. 2019)."""
        ours, theirs = self.block_shape(), teacher.block_shape()
        if ours != theirs:
            diff = " ".join(f"{k}={ours[k]}/{theirs[k]}" for k in ours if ours[k] != theirs[k])
            raise UserError(f"student_init=teacher_layers needs the teacher's width and block shape; "
                            f"student/teacher differ in {diff}")
        V, mine, src = self.config.vocab_size, self.transformer, teacher.transformer
        mine.wte.weight[:V] = src.wte.weight[:V]
        if not self.config.tie_embeddings:
            self.lm_head.weight[:V] = teacher.lm_head.weight[:V]
        if "wpe" in mine:
            mine.wpe.weight.copy_(src.wpe.weight[:self.config.block_size])
        mine.ln_f.load_state_dict(src.ln_f.state_dict())
        for i, j in enumerate(layers):
            mine.h[i].load_state_dict(src.h[j].state_dict())

    # ---------------------------------------------------------------- forward

    def hidden_states(self, idx, cache=None, positions=None):
        """idx (B, T) -> final-normed hidden states (B, T, C). positions (B, T): each token's
        absolute position (rows may differ, e.g. left-padded prompts); by default they follow the
        tokens already in the cache."""
        B, T = idx.shape
        if positions is None:
            start = 0 if cache is None else cache.pos
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
            positions = torch.arange(start, start + T, device=idx.device)
        x, rope = self.transformer.wte(idx), None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(positions)
        else:
            rope = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, cache)
        return self.transformer.ln_f(x)

    def logits(self, h):
        """Hidden states (..., C) -> logits (..., padded V); only the first vocab_size are real."""
        return self.lm_head(h)

    def forward(self, idx, targets=None, return_hidden=False):
        """idx (B, T) -> logits (B, T, padded V) for every position, and the mean cross-entropy
        over targets >= 0 (targets == -1 are ignored). Columns beyond config.vocab_size exist only
        for speed and never enter the loss."""
        h = self.hidden_states(idx)
        logits = self.logits(h)
        loss = None
        if targets is not None:
            V = self.config.vocab_size
            loss = F.cross_entropy(logits[..., :V].reshape(-1, V), targets.reshape(-1), ignore_index=-1)
        return (logits, loss, h) if return_hidden else (logits, loss)


def build(model_args, dtype=None, device=None):
    """The model a recorded architecture describes (a checkpoint's model_args: family and sizes).
    device="meta" builds it without memory, for weights to be read straight into it."""
    config = GPTConfig.from_dict(model_args)
    with torch.device(device or "cpu"):
        model = GPT(config)
    return model if dtype is None else model.to(dtype)
