"""Exact loss and perplexity of one or more models over a whole split, a text file or WikiText.

    python evaluate.py models=teacher=out/demo/teacher,distilled=out/demo/distilled dataset=data/shakespeare_char
    python evaluate.py models=gpt2,path/to/distilgpt2 text=wiki.test.raw stride=512
    python evaluate.py models=gpt2 wikitext=wikitext-2-raw-v1        # needs a network
    python evaluate.py models=gpt2 wikitext=data/wt2_saved            # a local copy (save_to_disk)

Every target token is scored exactly once. With stride < context, windows overlap and each
token after the first window is predicted with at least context - stride tokens of history (the
WikiText protocol of the GPT-2 evaluation reference: context 1024, stride 512).
"""
import json
import os

import numpy as np
import torch

from checkpoint import load_model
from configurator import OUT_FILE, UserError, run
from data import SPLITS, BinDataset
from evaluation import WIKITEXT_STRIDE, evaluate_model, wikitext_text
from inputs import named_sources, read_text_file, timestamped
from runtime import DTYPE_CHOICES, Runtime
from tokenizer import check_same, identity, tokenizer_from_meta

DEFAULTS = dict(
    models="",  # comma-separated sources (our out_dir, HF folder, GPT-2 name), optionally name=source
    dataset="",  # a prepared dataset folder to score ...
    split="val",  # ... its split
    text="",  # ... or a raw text file, tokenised with each model's tokenizer ...
    wikitext="",  # ... or WikiText's test split: a config (e.g. wikitext-2-raw-v1) or a save_to_disk copy
    block_size=0,  # tokens per window; 0: each model's own context
    stride=0,  # tokens between window starts; 0: block_size for datasets, 512 for text and WikiText
    batch_size=8,  # windows per forward pass
    device="auto",  # auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps
    dtype="auto",  # autocast dtype; auto: bfloat16 or float16 on GPUs, float32 on CPU
    out="",  # the JSON results; empty: out/eval/<timestamp>.json
)
LIMITS = dict(split=SPLITS, block_size="[0, inf)", stride="[0, inf)", batch_size="[1, inf)",
              dtype=DTYPE_CHOICES, out=OUT_FILE)


def load_eval_text(cfg):
    given = [k for k in ("dataset", "text", "wikitext") if cfg[k]]
    if len(given) != 1:
        raise UserError(f"give exactly one of dataset=, text= or wikitext= (got {given or 'none'})")
    if cfg["dataset"]:
        return BinDataset(cfg["dataset"]), None
    if cfg["text"]:
        return None, read_text_file(cfg["text"], "text=")
    return None, wikitext_text(cfg["wikitext"])


def main(cfg):
    models = named_sources(cfg["models"], "models")
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
            check_same(f"model {name}", tok_info, f"dataset {cfg['dataset']}", data.tokenizer,
                       "evaluate it on data prepared with its tokenizer")
            tokens, mask = data.tokens[cfg["split"]], data.masks.get(cfg["split"])
            stride = cfg["stride"] or block
        else:
            key = json.dumps(identity(tok_info), sort_keys=True)
            if key not in encoded:
                encoded[key] = np.array(tokenizer_from_meta(tok_info).encode(raw), dtype=np.int64)
            tokens, mask = encoded[key], None
            stride = cfg["stride"] or min(WIKITEXT_STRIDE, block)
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
    out = cfg["out"] or timestamped(os.path.join("out", "eval"), ".json")
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
