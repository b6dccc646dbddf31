"""Generate text from our checkpoint or HF GPT-2: samples to read, or teacher data as JSONL.

    python sample.py source=out/shakespeare_char start="ROMEO:" num_samples=3
    python sample.py source=gpt2-large start=FILE:prompt.txt temperature=0
    python sample.py source=out/teacher prompts=prompts.jsonl out=data/teacher.jsonl num_samples=4
    python sample.py api_base=http://localhost:8000/v1 model=teacher prompts=prompts.jsonl out=data/teacher.jsonl

With prompts= (a .txt of one prompt per line, or a .jsonl of {"prompt": ..., other fields}) every
prompt gets num_samples responses, written as JSONL records {"prompt", "response", other fields,
"index", "sample"}: the data of sequence-level distillation (Kim & Rush 2016), where a student is
fine-tuned on what the teacher writes. A killed run continues where it stopped when rerun with the
same arguments, and the finished file is byte for byte the one an uninterrupted run writes.

Prompts of any lengths share a batch (engine.py). Each row (prompt, sample) draws its random
numbers from its own generator, seeded by (seed, prompt index, sample): its text does not depend on
batch_size or on the rows beside it, up to the rounding of batched matmuls, which can change a
draw that falls within about 1e-6 of a token boundary.

With api_base= the teacher answers from an OpenAI-compatible endpoint instead (api_client.py):
one request per prompt for its samples, `concurrency` in flight, written as they come and put in
(index, sample) order once all are in, so the finished file is the same whatever the order of the
answers, kills and reruns. Each request carries seed=row_seed(seed, index, first sample): serve.py
samples row r of it with that seed + r, so a checkpoint served by serve.py writes the file
sample.py writes from the checkpoint itself.
"""
import collections
import contextlib
import json
import os
import sys
import time

import torch

import checkpoint
import engine
from api_client import API_DEFAULTS, API_LIMITS, Endpoint
from configurator import OUT_FILE, UserError, run
from inputs import check_file, field, read_jsonl, read_text_file
from runtime import DTYPE_CHOICES, Runtime
from tokenizer import prompt_ids

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
    **API_DEFAULTS,
    device="auto",  # auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps
    dtype="auto",  # autocast dtype; auto: bfloat16 or float16 on GPUs, float32 on CPU
    compile=False,  # torch.compile the model
)
LIMITS = dict(
    out=OUT_FILE, num_samples="[1, inf)", max_new_tokens="[1, inf)", temperature="[0, inf)",
    top_k="[0, inf)", top_p="(0, 1]", batch_size="[1, inf)",
    dtype=DTYPE_CHOICES, **API_LIMITS,
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
    ids = prompt_ids(tok, text)
    if len(ids) > block_size:
        raise UserError(f"{where} is {len(ids)} tokens, more than the model's context of {block_size}; "
                        f"shorten it")
    if not ids:
        raise UserError(f"{where}: the prompt is empty and the {tok.name} tokenizer has no "
                        f"end-of-text token to start from; give at least one character")
    return ids


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


def local_answers(model, tok, ids, done, cfg, rt):
    """[(index, sample, response)] per batch of rows generated here from the prompts' ids."""
    for rows in plan_batches(len(ids), cfg["num_samples"], cfg["batch_size"]):
        if any(r not in done for r in rows):
            yield [(i, s, text) for (i, s), text in zip(rows, complete(model, tok, ids, rows, cfg, rt))]


def api_answers(endpoint, prompts, done, cfg):
    """[(index, sample, response)] per answer of the endpoint, as they come: one request per prompt,
    for its samples from the first one missing on."""
    n = cfg["num_samples"]
    todo = [(i, next(s for s in range(n) if (i, s) not in done)) for i in range(len(prompts))
            if any((i, s) not in done for s in range(n))]
    for (i, first), texts in endpoint.map(asker(endpoint, prompts, cfg), todo):
        yield [(i, first + r, text) for r, text in enumerate(texts)]


def asker(endpoint, prompts, cfg):
    """(index, first sample) -> the texts of samples first .. num_samples-1 of that prompt."""
    extra = {"top_k": cfg["top_k"]} if cfg["top_k"] else None  # not OpenAI's own: sent only when used

    def ask(item):
        i, first = item
        want = cfg["num_samples"] - first
        answer = endpoint.complete(prompt=prompts[i][0], n=want, max_tokens=cfg["max_new_tokens"],
                                   temperature=cfg["temperature"], top_p=cfg["top_p"],
                                   seed=row_seed(cfg["seed"], i, first), extra_body=extra)
        if len(answer.choices) != want:
            raise UserError(f"{endpoint.base} answered {len(answer.choices)} choices to n={want}")
        return [c.text for c in sorted(answer.choices, key=lambda c: c.index)]
    return ask


def write_responses(answers, prompts, done, cfg):
    """Append the answers' records to out= (fsynced per answer), then, once every record is in,
    put them in (index, sample) order."""
    from tqdm import tqdm

    out, n = cfg["out"], cfg["num_samples"]
    left = collections.Counter(i for i in range(len(prompts)) for s in range(n) if (i, s) not in done)
    print(f"{len(prompts)} prompts x {n} samples; {len(done)} already in {out}", file=sys.stderr)
    t0, written, f = time.time(), 0, None
    with contextlib.ExitStack() as files, \
            tqdm(total=len(prompts), initial=len(prompts) - len(left), unit="prompt",
                 dynamic_ncols=True, file=sys.stderr) as bar:
        for rows in answers:
            if f is None:  # opened at the first answer: a request refused at once leaves no file
                os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
                f = files.enter_context(open(out, "a", encoding="utf-8"))
            for i, s, text in rows:
                if (i, s) in done:
                    continue
                prompt, extra = prompts[i]
                rec = dict(prompt=prompt, response=text, **extra, index=i, sample=s)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                done.add((i, s))
                written += 1
                left[i] -= 1
                if left[i] == 0:
                    bar.update()
            f.flush()
            os.fsync(f.fileno())  # what is on disk survives a kill: a rerun skips it
    print(f"wrote {written} records to {out} in {time.time() - t0:.1f}s", file=sys.stderr)
    missing = len(prompts) * n - len(done)
    if missing:
        print(f"max_requests={cfg['max_requests']} spent: {missing} records to go; rerun the same command "
              f"to continue", file=sys.stderr)
    else:
        sort_records(out)


def sort_records(path):
    """Rewrite `path` in (index, sample) order, as a local run writes it, unless it already is:
    answers from an endpoint come in any order."""
    with open(path, "rb") as f:
        lines = f.readlines()
    keys = [(r["index"], r["sample"]) for r in map(json.loads, lines)]
    if keys == sorted(keys):
        return
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.writelines(line for _, line in sorted(zip(keys, lines)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    checkpoint.fsync_dir(os.path.dirname(path) or ".")


def print_samples(texts, start):
    for text in texts:
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
    if cfg["api_base"]:
        endpoint = Endpoint(cfg)
        print(f"teacher: {cfg['model']} at {cfg['api_base']}", file=sys.stderr)
        if cfg["prompts"]:
            write_responses(api_answers(endpoint, prompts, done, cfg), prompts, done, cfg)
        else:
            print_samples(asker(endpoint, [(start, {})], cfg)((0, 0)), start)
        return
    rt = Runtime(cfg)
    model, tok = checkpoint.load_for_generation(cfg["source"], rt.device, cfg["compile"])
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, context {model.config.block_size}, "
          f"{tok.name} tokenizer; {rt.device} {rt.dtype}", file=sys.stderr)
    if cfg["prompts"]:
        block = model.config.block_size
        ids = [encode(tok, p, f"{cfg['prompts']} prompt {i}", block) for i, (p, _) in enumerate(prompts)]
        write_responses(local_answers(model, tok, ids, done, cfg, rt), prompts, done, cfg)
    else:
        ids = [encode(tok, start, "start", model.config.block_size)]
        for rows in plan_batches(1, cfg["num_samples"], cfg["batch_size"]):
            print_samples(complete(model, tok, ids, rows, cfg, rt), start)


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
