"""Checkpoints that survive kills, and loading any model source: our checkpoint, HF folder, GPT-2 name.

out_dir/ckpt_<step>.pt are the step checkpoints (the newest keep_last kept); ckpt.pt and best.pt
are hard links to one of them, so pointing at the latest costs no disk. Every file is written under
a temporary name, fsynced and renamed: a kill at any moment leaves the previous checkpoint whole.
Contents are plain types and tensors, so loading uses torch.load(weights_only=True) and a planted
pickle payload is refused rather than run.
"""
import glob
import os
import pickle
import re
import zipfile

import torch

import hf
from configurator import UserError, first_line
from model import build
from tokenizer import TOKENIZER_FILE, check_model, get_tokenizer, tokenizer_from_meta

LATEST, BEST = "ckpt.pt", "best.pt"
ZIP_MAGIC, PICKLE_MAGIC = b"PK\x03\x04", b"\x80"  # torch.save's format; pickle protocol 2+


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link(src, dst):
    tmp = dst + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.link(src, tmp)
    os.replace(tmp, dst)


def save(state, out_dir, step, keep_last=2, best=False):
    """Write step `step`, point ckpt.pt (and best.pt) at it, then prune old steps."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"ckpt_{step:08d}.pt")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _link(path, os.path.join(out_dir, LATEST))
    if best:
        _link(path, os.path.join(out_dir, BEST))
    fsync_dir(out_dir)
    # only now, with the new checkpoint safely on disk, may old ones go
    steps = sorted(glob.glob(os.path.join(out_dir, "ckpt_*.pt")))
    for old in steps[:-max(keep_last, 1)]:
        os.remove(old)  # best.pt keeps its own link to the data
    return path


def clear(out_dir):
    """Remove a previous run's checkpoints (overwrite=True): left in place, its higher steps would
    outrank the new run's in keep_last pruning."""
    names = glob.glob(os.path.join(out_dir, "ckpt_*.pt")) + [os.path.join(out_dir, n) for n in (LATEST, BEST)]
    for path in names:
        if os.path.lexists(path):
            os.remove(path)


def find(path):
    """A checkpoint file from a file or an out_dir."""
    if os.path.isdir(path):
        path = os.path.join(path, LATEST)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    return path


def _check_format(path):
    """A checkpoint is a torch zip archive or, from older torch, a pickle: anything else (a text
    file, a config) is said to be no checkpoint before torch tries to unpickle it."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise UserError(f"{path} is empty (0 bytes): not a checkpoint")
    if not (head == ZIP_MAGIC or head[:1] == PICKLE_MAGIC):
        raise UserError(f"{path} is not a checkpoint (not a torch zip or pickle file): expected a .pt "
                        f"written by train.py, distill.py or convert.py, or the out_dir holding one")


def load(path, map_location="cpu"):
    path = find(path)
    _check_format(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph whose one useful fact is the global it refused
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it would import {found[1]}" if found else first_line(e)
        raise UserError(f"{path} holds objects other than tensors and plain values ({what}); "
                        f"refused to load it") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path} is truncated or corrupt and cannot be loaded "
                        f"({type(e).__name__}); use an earlier ckpt_*.pt from the same folder") from None


def step_of(path):
    m = re.search(r"ckpt_(\d+)\.pt$", os.path.realpath(path))
    return int(m.group(1)) if m else None


def is_checkpoint(source):
    return os.path.isfile(source) or os.path.isfile(os.path.join(source, LATEST))


def is_hf_folder(source):
    return os.path.isdir(source) and os.path.isfile(os.path.join(source, "config.json"))


GPT2_TOKENIZER = {"tokenizer": "gpt2", "vocab_size": 50257}


def tokenizer_of(ckpt):
    """The checkpoint's tokenizer record; checkpoints from before records were kept are GPT-2's."""
    return ckpt.get("tokenizer", GPT2_TOKENIZER)


def model_from_checkpoint(ckpt, dropout=None, merge_lora=True):
    """Rebuild the model a checkpoint holds from the architecture it records (model_args: family
    and config; a record without a family is GPT-2's); a LoRA checkpoint is its base plus its
    adapters."""
    import lora
    info = ckpt.get("lora")
    if info:
        model, _, _ = load_model(info["base"], dropout=dropout)
        lora.apply(model, info["rank"], info["alpha"], info["dropout"], info["targets"])
        missing = set(lora.adapter_state(model)) - set(ckpt["model"])
        if missing:
            raise UserError(f"the LoRA checkpoint lacks adapter weights such as {sorted(missing)[0]}")
        model.load_state_dict(ckpt["model"], strict=False)
        model.lora_info = info
        return lora.merge(model) if merge_lora else model
    args = ckpt["model_args"] if dropout is None else dict(ckpt["model_args"], dropout=dropout)
    model = build(args)
    model.load_state_dict(ckpt["model"])
    return model


def hf_tokenizer(source):
    """The tokenizer record of a HF folder (its tokenizer.json, GPT-2's when a GPT-2 folder has
    none) or a GPT-2 hub name, checked against the vocab its config.json gives the model."""
    if not os.path.isdir(source):
        return GPT2_TOKENIZER
    fam, args = hf.read_config(source)
    if os.path.isfile(os.path.join(source, TOKENIZER_FILE)):  # GPT-2's own is recognised as gpt2
        tokenizer = get_tokenizer(source).info
    elif fam.tokenizer:
        tokenizer = dict(fam.tokenizer, vocab_size=args["vocab_size"])
    else:
        raise UserError(f"{source} holds no {TOKENIZER_FILE}, so its tokenizer is unknown; copy the "
                        f"model's tokenizer.json into it (transformers' tokenizer.save_pretrained writes one)")
    check_model(tokenizer, args["vocab_size"], source)
    return tokenizer


def load_model(source, device="cpu", dropout=None, dtype=None, pad_vocab_to=1):
    """(model, tokenizer info, checkpoint dict or None) from our checkpoint (file or out_dir), a
    HF folder (GPT-2, Llama or Qwen2; its tokenizer.json when it has one), or a GPT-2 name. LoRA
    adapters are merged into their base. dtype: the parameters' (default float32); a HF folder is
    read straight into them. pad_vocab_to: a HF model's embedding rows rounded up to a multiple."""
    if is_checkpoint(source):
        ckpt = load(source)
        model = model_from_checkpoint(ckpt, dropout)
        check_model(tokenizer_of(ckpt), model.config.vocab_size, source)
        return model.to(device=device, dtype=dtype), tokenizer_of(ckpt), ckpt
    if os.path.isdir(source) and not is_hf_folder(source):
        raise UserError(f"{source} holds neither {LATEST} nor a HF config.json")
    if not os.path.exists(source) and ("/" in source or source.endswith(".pt")):
        raise UserError(f"checkpoint not found: {source}")
    tokenizer = hf_tokenizer(source)  # before the weights are read: a mismatch should not wait for them
    model = hf.load(source, dtype=dtype, dropout=dropout or 0.0, pad_vocab_to=pad_vocab_to)
    check_model(tokenizer, model.config.vocab_size, source)
    return model.to(device), tokenizer, None


def load_for_generation(source, device, compile=False):
    """(model, tokenizer) of load_model's source, in eval mode with no gradients, for the engine.
    compile: hidden_states under torch.compile with dynamic shapes, because the engine calls it with
    a cache that grows by one token at a time (a recompile per length otherwise)."""
    model, tok_info, _ = load_model(source, device)
    model.eval().requires_grad_(False)
    if compile:
        model.hidden_states = torch.compile(model.hidden_states, dynamic=True)
    return model, tokenizer_from_meta(tok_info)
