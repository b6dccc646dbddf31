"""Exact loss and perplexity of one or more models over a whole split, a text file or WikiText.

    python evaluate.py models=teacher=out/demo/teacher,distilled=out/demo/distilled dataset=data/shakespeare_char
    python evaluate.py models=gpt2,path/to/distilgpt2 text=wiki.test.raw stride=512
    python evaluate.py models=gpt2 wikitext=wikitext-2-raw-v1        # needs a network

Every target token is scored exactly once. With stride < context, windows overlap and each
token after the first window is predicted with at least context - stride tokens of history (the
WikiText protocol of the GPT-2 evaluation reference: context 1024, stride 512).
"""
import json
import math
import os
import time

import numpy as np
import torch

from checkpoint import load_model
from configurator import OUT_FILE, UserError, read_text, run
from data import SPLITS, BinDataset
from trainer import DTYPES, Runtime, tokens_loss

DEFAULTS = dict(
    models="",  # comma-separated sources (our out_dir, HF folder, GPT-2 name), optionally name=source
    dataset="",  # a prepared dataset folder to score ...
    split="val",  # ... its split
    text="",  # ... or a raw text file, tokenised with each model's tokenizer ...
    wikitext="",  # ... or a WikiText config through `datasets` (e.g. wikitext-2-raw-v1), test split
    block_size=0,  # tokens per window; 0: each model's own context
    stride=0,  # tokens between window starts; 0: block_size for datasets, 512 for text and WikiText
    batch_size=8,  # windows per forward pass
    device="auto",  # auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps
    dtype="auto",  # autocast dtype; auto: bfloat16 or float16 on GPUs, float32 on CPU
    out="",  # the JSON results; empty: out/eval/<timestamp>.json
)
LIMITS = dict(split=SPLITS, block_size="[0, inf)", stride="[0, inf)", batch_size="[1, inf)",
              dtype=DTYPES, out=OUT_FILE)
TEXT_STRIDE = 512  # the reference's WikiText stride


def parse_models(spec):
    """[(name, source)] from "a,b" or "teacher=out/t,student=out/s"; a bare source is named by its folder."""
    models = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, source = item.rpartition("=") if "=" in item else ("", "", item)
        models.append((name or os.path.basename(source.rstrip("/")) or source, source))
    if not models:
        raise UserError("models= is required: comma-separated checkpoints, HF folders or GPT-2 names")
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise UserError(f"models= gives two models the same name ({names}); name them: a=path1,b=path2")
    return models


def wikitext_text(config_name):
    """The test split as the raw file (wiki.test.raw) reads."""
    try:
        from datasets import load_dataset
        rows = load_dataset("wikitext", config_name, split="test")["text"]
    except Exception as e:
        raise UserError(f"cannot load wikitext/{config_name} ({type(e).__name__}); offline, pass the "
                        f"raw test file with text=path/to/wiki.test.raw") from None
    # rows are the file's lines with their newlines, except its blank lines (" \n") which come back
    # empty: restoring them makes wikitext= and text=wiki.test.raw score the very same tokens
    return "".join(r or " \n" for r in rows)


def evaluate_model(model, tokens, block_size=0, stride=0, batch_size=8, device="cpu", autocast=None,
                   mask=None, split="val", progress=False):
    """Exact mean cross-entropy of `model` over every target of `tokens`, each scored once.

    tokens: a 1-D token array, or a data.BinDataset (its `split`, with its loss mask if any).
    block_size: tokens per window, 0 = the model's own context. stride: distance between window
    starts, 0 = block_size (non-overlapping); a smaller stride gives every target after the first
    window at least block_size - stride tokens of history. autocast: a context manager or None.
    Returns dict(params, loss, ppl, tokens (targets scored), tok_s, block_size, stride).
    """
    if hasattr(tokens, "tokens"):  # a BinDataset
        tokens, mask = tokens.tokens[split], tokens.masks.get(split)
    block_size = block_size or model.config.block_size
    stride = stride or block_size
    t = time.perf_counter()
    loss, n = tokens_loss(model, tokens, block_size, batch_size, device, autocast, stride, mask, progress)
    dt = time.perf_counter() - t
    return dict(params=model.num_params(), loss=loss, ppl=math.exp(loss) if loss < 700 else math.inf,
                tokens=n, tok_s=n / dt if dt > 0 else 0.0, block_size=block_size, stride=stride)


def check_tokenizer(name, tok_info, data, dataset):
    mine, theirs = tok_info, data.tokenizer
    same = (mine.get("tokenizer"), mine.get("vocab_size")) == (theirs.get("tokenizer"), theirs.get("vocab_size"))
    if same and mine.get("chars") and theirs.get("chars") and mine["chars"] != theirs["chars"]:
        raise UserError(f"{name} and {dataset} are both char-level with {theirs.get('vocab_size')} "
                        f"characters, but not the same characters: use the data the model was trained on")
    if not same:
        raise UserError(f"{name} uses tokenizer {mine.get('tokenizer')} (vocab {mine.get('vocab_size')}) "
                        f"but {dataset} was prepared with {theirs.get('tokenizer')} "
                        f"(vocab {theirs.get('vocab_size')}): evaluate it on data prepared with its tokenizer")


def load_eval_text(cfg):
    given = [k for k in ("dataset", "text", "wikitext") if cfg[k]]
    if len(given) != 1:
        raise UserError(f"give exactly one of dataset=, text= or wikitext= (got {given or 'none'})")
    if cfg["dataset"]:
        return BinDataset(cfg["dataset"]), None
    if cfg["text"]:
        return None, read_text(cfg["text"], "text=")
    return None, wikitext_text(cfg["wikitext"])


def main(cfg):
    models = parse_models(cfg["models"])
    data, raw = load_eval_text(cfg)
    rt = Runtime(cfg)
    encoded = {}  # one tokenisation of the text per distinct tokenizer
    results = {}
    for name, source in models:
        model, tok_info, _ = load_model(source, rt.device)
        block = cfg["block_size"] or model.config.block_size
        if block > model.config.block_size:
            raise UserError(f"block_size={block} exceeds {name}'s context of {model.config.block_size}")
        if data is not None:
            check_tokenizer(name, tok_info, data, cfg["dataset"])
            tokens, mask = data.tokens[cfg["split"]], data.masks.get(cfg["split"])
            stride = cfg["stride"] or block
        else:
            key = json.dumps(tok_info, sort_keys=True)
            if key not in encoded:
                from tokenizer import tokenizer_from_meta
                encoded[key] = np.array(tokenizer_from_meta(tok_info).encode(raw), dtype=np.int64)
            tokens, mask = encoded[key], None
            stride = cfg["stride"] or min(TEXT_STRIDE, block)
        if len(tokens) < 2:
            raise UserError("the text has fewer than 2 tokens: nothing to score")
        r = evaluate_model(model, tokens, block, stride, cfg["batch_size"], rt.device, rt.autocast(),
                           mask, progress=True)
        results[name] = dict(source=source, **r)
        print(f"{name}: loss {r['loss']:.4f}  ppl {r['ppl']:.3f}  ({r['tokens']:,} tokens, "
              f"context {block}, stride {stride})", flush=True)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(table(results))
    out = cfg["out"] or os.path.join("out", "eval", time.strftime("%Y%m%d-%H%M%S") + ".json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(results=results, config=cfg), f, indent=2)
    print(f"wrote {out}")


def table(results):
    lines = ["| model | params | loss | PPL | tokens scored | tokens/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['params'] / 1e6:.2f}M | {r['loss']:.4f} | {r['ppl']:.3f} | "
                     f"{r['tokens']:,} | {r['tok_s']:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main, DEFAULTS, LIMITS)
