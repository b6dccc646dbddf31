"""Generate text from our checkpoint or HF GPT-2: samples to read, or teacher data as JSONL.

    python sample.py source=out/shakespeare_char start="ROMEO:" num_samples=3
    python sample.py source=gpt2-large start=FILE:prompt.txt temperature=0
    python sample.py source=out/teacher prompts=prompts.jsonl out=data/teacher.jsonl num_samples=4

With prompts= (a .txt of one prompt per line, or a .jsonl of {"prompt": ..., other fields}) every
prompt gets num_samples responses, written as JSONL records {"prompt", "response", other fields,
"index", "sample"}: the data of sequence-level distillation (Kim & Rush 2016), where a student is
fine-tuned on what the teacher writes. A killed run continues where it stopped when rerun with the
same arguments, and the finished file is byte for byte the one an uninterrupted run writes.

Prompts of any lengths share a batch (engine.py). Each row (prompt, sample) draws its random
numbers from its own generator, seeded by (seed, prompt index, sample): its text does not depend on
batch_size or on the rows beside it, up to the rounding of batched matmuls, which can change a
draw that falls within about 1e-6 of a token boundary.
"""
import collections
import json
import os
import sys
import time

import torch

import checkpoint
import engine
from configurator import OUT_FILE, UserError, run
from inputs import check_file, field, read_jsonl, read_text_file
from runtime import DTYPE_CHOICES, Runtime
from tokenizer import tokenizer_from_meta

DEFAULTS = dict(
    source="out/run",  # our out_dir or .pt, a HF GPT-2 folder, or a GPT-2 name
    start="\n",  # the prompt, or FILE:path to read it from a file
    prompts="",  # a .txt (one prompt a line) or .jsonl ({"prompt": ...}) of prompts; needs out=
    out="",  # the .jsonl the responses to prompts= are written to (a rerun continues it)
    num_samples=3,  # samples per prompt
    max_new_tokens=200,  # tokens generated per sample, at most
    temperature=0.8,  # 0: greedy
    top_k=200,  # sample among the k likeliest tokens; 0: off
    top_p=1.0,  # sample within the smallest set of tokens holding this probability; 1: off
    batch_size=16,  # rows per generate call (prompts x samples)
    seed=1337,  # seed of the sampling
    device="auto",  # auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps
    dtype="auto",  # autocast dtype; auto: bfloat16 or float16 on GPUs, float32 on CPU
    compile=False,  # torch.compile the model
)
LIMITS = dict(
    out=OUT_FILE, num_samples="[1, inf)", max_new_tokens="[1, inf)", temperature="[0, inf)",
    top_k="[0, inf)", top_p="(0, 1]", batch_size="[1, inf)",
    dtype=DTYPE_CHOICES,
)
RESERVED = ("prompt", "response", "index", "sample")
DASHES = "-" * 40


def read_prompts(path):
    """[(prompt, extra fields)] from a .txt (one per non-blank line) or a .jsonl file."""
    if path.endswith(".jsonl"):
        check_file(path, "prompts=")
        prompts = [p for _, p in read_jsonl(path, _prompt, skip_bad=True)]
    else:
        prompts = [(line, {}) for line in read_text_file(path, "prompts=").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path} holds no prompts (one per line, or JSON objects with a 'prompt')")
    return prompts


def _prompt(record):
    # a response already in the input is replaced by the one generated here
    return field(record, "prompt", blank_ok=True), {k: v for k, v in record.items() if k not in RESERVED}


def encode(tok, text, where, block_size):
    ids = tok.encode(text)
    if len(ids) > block_size:
        raise UserError(f"{where} is {len(ids)} tokens, more than the model's context of {block_size}; "
                        f"shorten it")
    if ids:
        return ids
    if tok.eot is None:
        raise UserError(f"{where}: the prompt is empty and the {tok.name} tokenizer has no "
                        f"end-of-text token to start from; give at least one character")
    return [tok.eot]  # GPT-2 was trained with <|endoftext|> between documents: a fresh start


def plan_batches(n_prompts, num_samples, batch_size):
    """Rows (prompt index, sample) in order, in batches of whole prompts (batch_size // num_samples
    of them), or of one prompt's samples batch_size at a time when num_samples > batch_size. A pure
    function of its arguments: a rerun rebuilds the same batches, so a batch cut short by a kill is
    regenerated identically."""
    per = max(1, batch_size // num_samples)
    batches = []
    for first in range(0, n_prompts, per):
        rows = [(i, s) for i in range(first, min(first + per, n_prompts)) for s in range(num_samples)]
        batches += [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]
    return batches


def row_seed(seed, index, sample):
    return ((seed * 1_000_003 + index) * 1_000_003 + sample) % 2 ** 63


def complete(model, tok, ids, rows, cfg, rt):
    """Responses for the rows of one batch (each of its prompts with the same samples): decoded
    text cut before the first end-of-text."""
    prompts = sorted({i for i, _ in rows})
    gens = [torch.Generator(rt.device).manual_seed(row_seed(cfg["seed"], i, s)) for i, s in rows]
    with rt.autocast():
        out = engine.generate(model, [ids[i] for i in prompts], cfg["max_new_tokens"], len(rows) // len(prompts),
                              cfg["temperature"], cfg["top_k"], cfg["top_p"],
                              stop_tokens=() if tok.eot is None else (tok.eot,), generator=gens)
    return [tok.decode(c.tokens) for c in out]


def read_done(path, prompts):
    """(index, sample) pairs already written to `path`. A torn last line, what a kill in the middle
    of a write leaves, is truncated away so appending continues from whole records."""
    done, good_bytes = set(), 0
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
                key, same = (rec["index"], rec["sample"]), rec["prompt"] == prompts[rec["index"]][0]
            except (ValueError, KeyError, TypeError, IndexError):
                raise UserError(f"{path}:{n}: not a record written by sample.py; choose another out= "
                                f"or remove the file") from None
            if not same:
                raise UserError(f"{path}:{n}: prompt {key[0]} differs from the prompts file: {path} was "
                                f"written from other prompts; choose another out=")
            done.add(key)
            good_bytes += len(line)
    if good_bytes < os.path.getsize(path):
        print(f"{path}: cut off a partial last record left by an interrupted run", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
            os.fsync(f.fileno())
    return done


def write_responses(model, tok, prompts, done, cfg, rt):
    from tqdm import tqdm

    block = model.config.block_size
    ids = [encode(tok, p, f"{cfg['prompts']} prompt {i}", block) for i, (p, _) in enumerate(prompts)]
    batches = plan_batches(len(ids), cfg["num_samples"], cfg["batch_size"])
    out = cfg["out"]
    left = collections.Counter(i for rows in batches for i, s in rows if (i, s) not in done)
    print(f"{len(prompts)} prompts x {cfg['num_samples']} samples in {len(batches)} batches; "
          f"{len(done)} already in {out}", file=sys.stderr)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    t0, written = time.time(), 0
    with open(out, "a", encoding="utf-8") as f, \
            tqdm(total=len(prompts), initial=len(prompts) - len(left), unit="prompt",
                 dynamic_ncols=True, file=sys.stderr) as bar:
        for rows in batches:
            todo = [(k, r) for k, r in enumerate(rows) if r not in done]
            if not todo:
                continue
            texts = complete(model, tok, ids, rows, cfg, rt)
            for k, (i, s) in todo:
                prompt, extra = prompts[i]
                rec = dict(prompt=prompt, response=texts[k], **extra, index=i, sample=s)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                left[i] -= 1
                if left[i] == 0:
                    bar.update()
            f.flush()
            os.fsync(f.fileno())  # what is on disk survives a kill: a rerun skips it
            written += len(todo)
    print(f"wrote {written} records to {out} in {time.time() - t0:.1f}s", file=sys.stderr)


def print_samples(model, tok, start, cfg, rt):
    ids = [encode(tok, start, "start", model.config.block_size)]
    for rows in plan_batches(1, cfg["num_samples"], cfg["batch_size"]):
        for text in complete(model, tok, ids, rows, cfg, rt):
            print(start + text)
            print(DASHES, flush=True)


def main(cfg):
    if bool(cfg["prompts"]) != bool(cfg["out"]):
        raise UserError("prompts=FILE and out=FILE.jsonl go together (for one prompt use start=)")
    # files are read before the model is loaded: a mistake in them should not wait for it
    if cfg["prompts"]:
        prompts = read_prompts(cfg["prompts"])
        done = read_done(cfg["out"], prompts)
    start = cfg["start"]
    if start.startswith("FILE:"):
        start = read_text_file(start[len("FILE:"):], "start=FILE:")
    rt = Runtime(cfg)
    model, tok_info, _ = checkpoint.load_model(cfg["source"], rt.device)
    model.eval()
    if cfg["compile"]:
        # the engine calls hidden_states once per new token with a growing cache: dynamic shapes
        # spare a recompile per length
        model.hidden_states = torch.compile(model.hidden_states, dynamic=True)
    tok = tokenizer_from_meta(tok_info)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, context {model.config.block_size}, "
          f"{tok.name} tokenizer; {rt.device} {rt.dtype}", file=sys.stderr)
    if cfg["prompts"]:
        write_responses(model, tok, prompts, done, cfg, rt)
    else:
        print_samples(model, tok, start, cfg, rt)


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
