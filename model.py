"""GPT-2, written out in full: the model, its KV-cache protocol, and HF weights in and out.

Architecture as in Radford et al. 2019 and the released checkpoints: learned absolute positions,
pre-LayerNorm blocks, GELU (tanh approximation, "gelu_new"), a final LayerNorm, and an LM head
tied to the token embedding.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from configurator import UserError


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257  # the tokenizer's vocab; the embedding may be padded beyond it
    pad_vocab_to: int = 64  # 50257 -> 50304 keeps matmuls on fast tile sizes; 1 for HF weights
    bias: bool = True
    dropout: float = 0.0

    @property
    def padded_vocab_size(self):
        return math.ceil(self.vocab_size / self.pad_vocab_to) * self.pad_vocab_to

    @classmethod
    def from_dict(cls, d):
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


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.layer = layer  # the cache keeps keys and values per layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # the cache's owner says which earlier keys each query may see (padding, causality)
            k, v = cache.update(self.layer, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer): two per block add to the stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, T=None):
        """Training FLOPs per token, 6N + 12·L·C·T (Kaplan et al. 2020; PaLM appendix B): the
        matmuls' forward+backward plus attention scores over the context."""
        cfg = self.config
        T = cfg.block_size if T is None else T
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * T

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
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache)
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

    # ---------------------------------------------------------------- HF GPT-2 weights

    @classmethod
    def from_pretrained(cls, name_or_dir, dropout=0.0):
        """A local HF GPT-2 folder (config.json + model.safetensors or pytorch_model.bin), or a
        hub name such as gpt2-large when a network is there."""
        folder = name_or_dir if os.path.isdir(name_or_dir) else _download(name_or_dir)
        path = os.path.join(folder, "config.json")
        try:
            with open(path) as f:
                hf = json.load(f)
            sizes = {ours: hf[theirs] for ours, theirs in (("n_layer", "n_layer"), ("n_head", "n_head"),
                     ("n_embd", "n_embd"), ("block_size", "n_positions"), ("vocab_size", "vocab_size"))}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not a GPT-2 config.json ({type(e).__name__}: {e}); "
                            f"re-download or re-export it") from None
        if hf.get("model_type", "gpt2") != "gpt2":
            raise UserError(f"{folder}: model_type {hf.get('model_type')!r} is not GPT-2")
        config = GPTConfig(**sizes, pad_vocab_to=1, bias=True, dropout=dropout)
        model = cls(config)
        sd = _load_hf_state_dict(folder)
        ours = model.state_dict()
        for key in ours:
            if key == "lm_head.weight":
                continue  # tied to wte
            hf_key = key
            if hf_key not in sd:
                raise UserError(f"{folder}: weight {key} missing from the checkpoint")
            w = sd[hf_key]
            if key.endswith(_CONV1D):
                w = w.t()  # HF's Conv1D stores (in, out); nn.Linear wants (out, in)
            if w.shape != ours[key].shape:
                raise UserError(f"{folder}: {key} has shape {tuple(w.shape)}, config.json implies "
                                f"{tuple(ours[key].shape)}")
            ours[key].copy_(w)
        return model


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _download(name):
    if name not in GPT2_SIZES and name != "distilgpt2":
        raise UserError(f"'{name}' is neither a folder nor a GPT-2 name ({', '.join(GPT2_SIZES)}, distilgpt2)")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name if name != "gpt2" else "openai-community/gpt2",
                                 allow_patterns=["config.json", "*.safetensors"])
    except Exception as e:
        raise UserError(f"cannot download '{name}' ({type(e).__name__}); with no network pass a local "
                        f"HF folder holding config.json and model.safetensors instead") from None


def _load_hf_state_dict(folder):
    st = os.path.join(folder, "model.safetensors")
    binf = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(st):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            sd = load_file(st)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{st} is truncated or corrupt ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]}); re-download or re-export it") from None
    elif os.path.exists(binf):
        # weights_only refuses pickled code: a .bin from the internet cannot run anything
        try:
            sd = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{binf}: refused to load ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    else:
        raise UserError(f"{folder} holds no weights: expected model.safetensors or pytorch_model.bin")
    # GPT2LMHeadModel saves "transformer.*"; a bare GPT2Model saves the same names unprefixed
    return {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v
            for k, v in sd.items()}


def export_hf(model, folder):
    """Write `folder` so that transformers.GPT2LMHeadModel.from_pretrained(folder) loads it."""
    from safetensors.torch import save_file
    cfg = model.config
    os.makedirs(folder, exist_ok=True)
    sd = {}
    for key, w in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # HF re-ties it to wte
        w = w.detach().float().cpu()
        if key == "transformer.wte.weight":
            w = w[:cfg.vocab_size]  # drop the padding rows
        elif key.endswith(_CONV1D):
            w = w.t()
        sd[key] = w.contiguous()
    if not cfg.bias:  # HF GPT-2 always has biases: zeros are the same function
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.LayerNorm)) and mod.bias is None and name != "lm_head":
                sd[name + ".bias"] = torch.zeros(mod.weight.shape[0])
    save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_inner": None,
        "vocab_size": cfg.vocab_size, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "bos_token_id": cfg.vocab_size - 1, "eos_token_id": cfg.vocab_size - 1,
        "tie_word_embeddings": True, "torch_dtype": "float32",
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
