"""Exact loss and perplexity of one or more models over a whole split, a text file or WikiText.

    python evaluate.py models=teacher=out/demo/teacher,distilled=out/demo/distilled dataset=data/shakespeare_char
    python evaluate.py models=gpt2,path/to/distilgpt2 text=wiki.test.raw stride=512
    python evaluate.py models=gpt2 wikitext=wikitext-2-raw-v1        # needs a network
    python evaluate.py models=gpt2 wikitext=data/wt2_saved            # a local copy (save_to_disk)

    python evaluate.py models=teacher=out/t,student=out/s dataset=data/mydata teacher=teacher

Every target token is scored exactly once. With stride < context, windows overlap and each
token after the first window is predicted with at least context - stride tokens of history (the
WikiText protocol of the GPT-2 evaluation reference: context 1024, stride 512).

teacher=NAME (a name in models=) runs every other model beside that reference over the same
windows, at the smaller of their two contexts (one line says so when a context must shrink), and
adds per scored token the KL divergence KL(reference || model) in nats and the top-1 agreement, the
fraction of targets where both models' most likely tokens are the same. The reference's own row
comes from the first such pass at its own context. Every model gets its expected calibration
error (ECE): top-1 confidence against top-1 accuracy on the real next token, in ece_bins
equal-width bins (k/M, (k+1)/M], 15 as Guo et al. 2017; the JSON keeps each bin's tokens, mean
confidence and accuracy, the data of a reliability diagram.
"""
import json
import os

import numpy as np
import torch

from checkpoint import load_model
from configurator import OUT_FILE, UserError, run
from data import SPLITS, BinDataset
from evaluation import ECE_BINS, WIKITEXT_STRIDE, evaluate_models, wikitext_text
from inputs import named_sources, read_text_file, timestamped
from runtime import DTYPE_CHOICES, Runtime
from tokenizer import check_same, identity, tokenizer_from_meta

DEFAULTS = dict(
    models="",  # comma-separated sources (our out_dir, HF folder, GPT-2 name), optionally name=source
    dataset="",  # a prepared dataset folder to score ...
    split="val",  # ... its split
    text="",  # ... or a raw text file, tokenised with each model's tokenizer ...
    wikitext="",  # ... or WikiText's test split: a config (e.g. wikitext-2-raw-v1) or a save_to_disk copy
    teacher="",  # a name in models=: every other model gets KL(teacher || model) and top-1 agreement
    ece_bins=ECE_BINS,  # equal-width confidence bins of each model's expected calibration error
    block_size=0,  # tokens per window; 0: each model's own context (with teacher=, the smaller of a pair's)
    stride=0,  # tokens between window starts; 0: block_size for datasets, 512 for text and WikiText
    batch_size=8,  # windows per forward pass
    device="auto",  # auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps
    dtype="auto",  # autocast dtype; auto: bfloat16 or float16 on GPUs, float32 on CPU
    out="",  # the JSON results; empty: out/eval/<timestamp>.json
)
LIMITS = dict(split=SPLITS, ece_bins="[1, inf)", block_size="[0, inf)", stride="[0, inf)",
              batch_size="[1, inf)", dtype=DTYPE_CHOICES, out=OUT_FILE)


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
    reference = cfg["teacher"]
    names = [name for name, _ in models]
    if reference and reference not in names:
        raise UserError(f"teacher={reference} names none of models= ({', '.join(names)}); name the "
                        f"reference there, e.g. models=teacher=out/t,student=out/s teacher=teacher")
    text = EvalText(cfg, *load_eval_text(cfg))
    rt = Runtime(cfg)
    sources = dict(models)
    results = {}
    ref = load_model(sources[reference], rt.device)[:2] if reference else None
    ref_block = own_block(cfg, ref[0], reference) if ref else None
    for name in names:
        if name == reference:
            continue
        loaded = load_model(sources[name], rt.device)[:2]
        if ref is None:
            results.update(score(cfg, {name: loaded}, text, rt))
        else:
            check_same(f"model {name}", loaded[1], f"teacher {reference}", ref[1],
                       "compare models that share one tokenizer")
            pair = score(cfg, {reference: ref, name: loaded}, text, rt, reference)
            results[name] = pair[name]
            if reference not in results and pair[reference]["block_size"] == ref_block:
                results[reference] = pair[reference]  # its own windows: no pass of its own needed
        del loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if reference and reference not in results:
        results.update(score(cfg, {reference: ref}, text, rt))
    results = {name: dict(source=sources[name], **results[name]) for name in names}
    print(table(results, reference))
    out = cfg["out"] or timestamped(os.path.join("out", "eval"), ".json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(results=results, config=cfg), f, indent=2)
    print(f"wrote {out}")


class EvalText:
    """The scored tokens (and loss mask) for a model's tokenizer: a dataset's split, or the text
    tokenised once per distinct tokenizer."""

    def __init__(self, cfg, data, raw):
        self.cfg, self.data, self.raw, self.encoded = cfg, data, raw, {}

    def tokens(self, name, tok_info):
        if self.data is not None:
            check_same(f"model {name}", tok_info, f"dataset {self.cfg['dataset']}", self.data.tokenizer,
                       "evaluate it on data prepared with its tokenizer")
            split = self.cfg["split"]
            return self.data.tokens[split], self.data.masks.get(split)
        key = json.dumps(identity(tok_info), sort_keys=True)
        if key not in self.encoded:
            self.encoded[key] = np.array(tokenizer_from_meta(tok_info).encode(self.raw), dtype=np.int64)
        return self.encoded[key], None

    def stride(self, block):
        if self.cfg["stride"]:
            return self.cfg["stride"]
        return block if self.data is not None else min(WIKITEXT_STRIDE, block)


def own_block(cfg, model, name):
    block = cfg["block_size"] or model.config.block_size
    if block > model.config.block_size:
        raise UserError(f"block_size={block} exceeds {name}'s context of {model.config.block_size}")
    return block


def score(cfg, loaded, text, rt, reference=None):
    """One pass of every model in loaded ({name: (model, tokenizer info)}) over the same windows:
    the smallest of their contexts unless block_size= is given."""
    blocks = {name: own_block(cfg, model, name) for name, (model, _) in loaded.items()}
    block = min(blocks.values())
    if len(set(blocks.values())) > 1:
        print(f"{' and '.join(blocks)} are compared over windows of {block} tokens, the smaller of "
              f"their contexts ({', '.join(f'{n}: {b}' for n, b in blocks.items())})", flush=True)
    for name, (_, tok_info) in loaded.items():  # one tokenizer: the same tokens for every model
        tokens, mask = text.tokens(name, tok_info)
    if len(tokens) < 2:
        raise UserError("the text has fewer than 2 tokens: nothing to score")
    stride = text.stride(block)
    results = evaluate_models({n: model for n, (model, _) in loaded.items()}, tokens, block, stride,
                              cfg["batch_size"], rt.device, rt.autocast(), mask, reference=reference,
                              bins=cfg["ece_bins"], progress=True)
    for n, r in results.items():
        against = f"  KL from {reference} {r['kl']:.4f}  agreement {r['agreement']:.2%}" if "kl" in r else ""
        print(f"{n}: loss {r['loss']:.4f}  ppl {r['ppl']:.3f}  ECE {r['ece']:.4f}{against}  "
              f"({r['tokens']:,} tokens, context {block}, stride {stride})", flush=True)
    return results


def table(results, reference=None):
    compare = ["KL from " + reference, "top-1 agreement"] if reference else []
    head = ["model", "params", "loss", "PPL", "ECE", *compare, "tokens scored", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for name, r in results.items():
        row = [name, f"{r['params'] / 1e6:.2f}M", f"{r['loss']:.4f}", f"{r['ppl']:.3f}", f"{r['ece']:.4f}"]
        if reference:
            row += [f"{r['kl']:.4f}", f"{r['agreement']:.2%}"] if "kl" in r else ["-", "-"]
        row += [f"{r['tokens']:,}", f"{r['tok_s']:,.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main, DEFAULTS, LIMITS)
