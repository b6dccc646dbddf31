"""LoRA (Hu et al. 2021): frozen base weights plus a trainable low-rank update B·A·(alpha/rank).

Targets are the names the model gives the linears of its blocks (model.lora_targets): attn (q, k
and v), attn_proj (the attention output), mlp (the MLP's input; Llama: gate and up), mlp_proj (its
output). B starts at zero, so the adapted model starts equal to the base. A LoRA checkpoint stores
only the adapters and the name of its base; `merge` folds them into plain weights.
"""
import math

import torch
import torch.nn as nn

from configurator import UserError
from inputs import comma_list

class LoRALinear(nn.Module):
    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self):
        with torch.no_grad():
            self.base.weight += (self.lora_B @ self.lora_A) * self.scale
        return self.base


def apply(model, rank, alpha, dropout=0.0, targets="attn,attn_proj,mlp,mlp_proj"):
    """Freeze every base weight and wrap the target linears of every block; returns the model."""
    if rank <= 0:
        raise UserError(f"lora_rank={rank} must be positive")
    model.requires_grad_(False)
    names = comma_list(targets, "lora_targets", choices=model.lora_targets)
    for block in model.blocks:
        for t in names:
            parent_name, child = model.lora_targets[t].split(".")
            parent = getattr(block, parent_name)
            setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return model


def adapter_state(model):
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def merge(model):
    """Fold every adapter into its base linear: a plain model again, same outputs."""
    for parent in list(model.modules()):
        for child, mod in list(parent.named_children()):
            if isinstance(mod, LoRALinear):
                setattr(parent, child, mod.merged())
    return model
