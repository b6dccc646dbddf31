"""Exact loss and perplexity of one or more models over a whole split, a text file or WikiText.

    python evaluate.py models=teacher=out/demo/teacher,distilled=out/demo/distilled dataset=data/shakespeare_char
    python evaluate.py models=gpt2,path/to/distilgpt2 text=wiki.test.raw stride=512
    python evaluate.py models=gpt2 wikitext=wikitext-2-raw-v1        # needs a network

Every target token is scored exactly once. With stride < context, windows overlap and each
token is predicted with at least context - stride tokens of history (the WikiText protocol of
the GPT-2 evaluation reference: context 1024, stride 512).
"""
import json
import math
import os
import time

import numpy as np
import torch

from checkpoint import load_model
from configurator import UserError, run
from trainer import Runtime, tokens_loss

DEFAULTS = dict(
    models="",  # comma-separated sources (our out_dir, HF folder, GPT-2 name), optionally name=source
    dataset="", split="val",  # a prepared dataset ...
    text="",  # ... or a raw text file, tokenised with each model's tokenizer ...
    wikitext="",  # ... or a WikiText config through `datasets` (e.g. wikitext-2-raw-v1), test split
    block_size=0,  # 0 = each model's own context
    stride=0,  # 0 = block_size for datasets (non-overlapping), 512 for text and WikiText
    batch_size=8, device="auto", dtype="auto", out="",
)


def parse_models(spec):
    models = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, source = item.rpartition("=") if "=" in item else ("", "", item)
        models.append((name or os.path.basename(source.rstrip("/")) or source, source))
    if not models:
        raise UserError("models= is required: comma-separated checkpoints, HF folders or GPT-2 names")
    return models


def wikitext_text(config_name):
    try:
        from datasets import load_dataset
        ds = load_dataset("wikitext", config_name, split="test")
    except Exception as e:
        raise UserError(f"cannot load wikitext/{config_name} ({type(e).__name__}); offline, pass the "
                        f"raw test file with text=path/to/wiki.test.raw") from None
    return "".join(ds["text"])


def evaluate_model(model, tokens, block_size, stride, batch_size, device, autocast=None, mask=None):
    """Loss, perplexity, tokens scored and tokens/s of `model` over a 1-D token array."""
    t = time.perf_counter()
    loss, n = tokens_loss(model, tokens, block_size, batch_size, device, autocast, stride, mask)
    dt = time.perf_counter() - t
    return dict(params=model.num_params(), loss=loss, ppl=math.exp(min(loss, 50)), tokens=n,
                tok_s=n / dt if dt > 0 else 0.0, block_size=block_size, stride=stride)


def main(cfg):
    sources = [cfg["dataset"], cfg["text"], cfg["wikitext"]]
    if sum(bool(s) for s in sources) != 1:
        raise UserError("give exactly one of dataset=, text= or wikitext=")
    rt = Runtime(cfg)
    models = parse_models(cfg["models"])
    data = raw = None
    if cfg["dataset"]:
        from data import BinDataset
        data = BinDataset(cfg["dataset"])
        if cfg["split"] not in data.tokens:
            raise UserError(f"split={cfg['split']!r}: use train or val")
    elif cfg["text"]:
        if not os.path.isfile(cfg["text"]):
            raise UserError(f"text file not found: {cfg['text']}")
        with open(cfg["text"], encoding="utf-8") as f:
            raw = f.read()
    else:
        raw = wikitext_text(cfg["wikitext"])
    results = {}
    for name, source in models:
        model, tok_info, _ = load_model(source, rt.device)
        block = cfg["block_size"] or model.config.block_size
        if block > model.config.block_size:
            raise UserError(f"block_size={block} exceeds {name}'s context {model.config.block_size}")
        if data is not None:
            mine = data.tokenizer
            if (tok_info.get("tokenizer"), tok_info.get("vocab_size")) != (mine.get("tokenizer"), mine.get("vocab_size")):
                raise UserError(f"{name} uses tokenizer {tok_info.get('tokenizer')} (vocab {tok_info.get('vocab_size')}) "
                                f"but {cfg['dataset']} was prepared with {mine.get('tokenizer')} "
                                f"(vocab {mine.get('vocab_size')})")
            tokens, mask = data.tokens[cfg["split"]], data.masks.get(cfg["split"])
            stride = cfg["stride"] or block
        else:
            from tokenizer import tokenizer_from_meta
            tokens, mask = np.array(tokenizer_from_meta(tok_info).encode(raw), dtype=np.int64), None
            stride = min(cfg["stride"] or 512, block)
        if len(tokens) < 2:
            raise UserError("the text has fewer than 2 tokens: nothing to score")
        r = evaluate_model(model, tokens, block, stride, cfg["batch_size"], rt.device, rt.autocast(), mask)
        results[name] = dict(source=source, **r)
        print(f"evaluated {name}: loss {r['loss']:.4f} ppl {r['ppl']:.3f}", flush=True)
        del model
    print(table(results))
    out = cfg["out"] or os.path.join("out", "eval", time.strftime("%Y%m%d-%H%M%S") + ".json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(results=results, config=cfg), f, indent=2)
    print(f"wrote {out}")


def table(results):
    lines = ["| model | params | loss | PPL | tokens scored | tokens/s |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['params'] / 1e6:.2f}M | {r['loss']:.4f} | {r['ppl']:.3f} | "
                     f"{r['tokens']:,} | {r['tok_s']:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main, DEFAULTS)
