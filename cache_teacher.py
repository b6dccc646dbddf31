"""Run a teacher (or an ensemble) once over a prepared dataset's train split and keep, per target
token, its top-k log-probabilities and the log of the rest's mass: every student, every epoch,
then distills from disk without the teacher's forward pass.

    python cache_teacher.py teacher=out/teacher dataset=data/shakespeare_char block_size=256 top_k=0
    python cache_teacher.py teacher=gpt2-large dataset=data/openwebtext block_size=1024 top_k=64
    python cache_teacher.py teacher=out/a,out/b,0.7,0.3 dataset=data/babylm   # a 0.7/0.3 mixture
    torchrun --standalone --nproc_per_node=8 cache_teacher.py teacher=gpt2-large ...
    python distill.py ... teacher_cache=data/<name>/teacher_<id>               # then train from it
    python cache_teacher.py api_base=http://localhost:8000/v1 model=teacher dataset=data/owt top_k=20

A killed run continues where it stopped when rerun with the same arguments (under any number of
ranks), and the finished files are byte for byte an uninterrupted run's. teacher_cache.py holds
the format.

With api_base= the teacher is a model behind an OpenAI-compatible endpoint (serve.py, vLLM): one
completions request per window, its T + 1 tokens sent as ids with echo=true, logprobs=top_k,
max_tokens=0 and return_tokens_as_token_ids, `concurrency` at a time. A block is written once all
of its windows are in, so kills and a spent max_requests resume as above. The top-k columns are the
endpoint's values exactly (JSON carries float32 values exactly; serve.py scores a prompt as this
script scores a window); the rest's log-mass is computed from them (api_client.prompt_top_k).
"""
import math
import os

import numpy as np
import torch

from api_client import API_DEFAULTS, API_LIMITS, Endpoint, prompt_top_k
from configurator import OUT_DIR, UserError, run
from data import BinDataset
from runtime import DTYPE_CHOICES, Runtime
from scoring import teacher_rows
from teacher_cache import DTYPES, Writer, blocks_done, blocks_of, create, finish, load_teachers, \
    make_meta, plan, remote_identity

DEFAULTS = dict(
    teacher="",  # our out_dir / ckpt.pt, a HF GPT-2 folder or name; a,b[,wa,wb]: their mixture
    dataset="data/shakespeare_char",  # a prepared dataset; its train split is cached
    block_size=256,  # the student's context: windows of this many targets
    top_k=64,  # tokens kept per target; 0 keeps the whole distribution (small vocabularies)
    cache_dtype="float16",  # float16, bfloat16, or float32 (exactness checks)
    batch_size=16,  # windows per teacher forward; fixes the blocks a rerun resumes at
    windows=0,  # cache only the first N windows (students draw among them); 0: the whole train split
    out="",  # the cache folder; default <dataset>/teacher_<id>
    overwrite=False,  # replace a cache of other settings in out
    **API_DEFAULTS,
    device="auto",  # auto (cuda if available, else cpu), cpu, cuda, cuda:N
    dtype="auto",  # the teacher's autocast: bfloat16 where CUDA has it, float32 on CPU
    compile=False,  # torch.compile the teacher
)
LIMITS = dict(top_k="[0, inf)", cache_dtype=tuple(DTYPES), batch_size="[1, inf)", block_size="[1, inf)", out=OUT_DIR,
              dtype=DTYPE_CHOICES, windows="[0, inf)", **API_LIMITS)


def check(cfg, data):
    if not cfg["teacher"] and not cfg["api_base"]:
        raise UserError("teacher= is required: an out_dir, HF folder or GPT-2 name, or several "
                        "as a,b[,weight_a,weight_b]; or api_base= and model= for a teacher behind an endpoint")
    if cfg["teacher"] and cfg["api_base"]:
        raise UserError(f"teacher={cfg['teacher']} and api_base={cfg['api_base']}: give one of them")
    if cfg["api_base"] and cfg["top_k"] == 0:
        raise UserError("top_k=0 keeps whole distributions, which an endpoint does not send: give top_k >= 1 "
                        "with api_base=")
    if cfg["top_k"] >= data.vocab_size:
        raise UserError(f"top_k={cfg['top_k']} must be below the vocabulary ({data.vocab_size}); "
                        f"top_k=0 keeps the whole distribution")
    if cfg["block_size"] >= len(data.tokens["train"]):
        raise UserError(f"block_size={cfg['block_size']} must be below the train "
                        f"split's {len(data.tokens['train'])} tokens")
    if cfg["windows"] > data.windows_of(cfg["block_size"]):
        raise UserError(f"windows={cfg['windows']} exceeds the {data.windows_of(cfg['block_size'])} "
                        f"windows of block_size={cfg['block_size']} in the train split: lower it, or 0 for all")


def write(cfg, rt, data, teachers, weights, folder, meta):
    """This rank's share of the blocks (a contiguous range), skipping those already on disk."""
    from tqdm import tqdm

    B, T, windows = meta["batch_size"], meta["block_size"], meta["windows"]
    blocks = blocks_of(meta)
    mine = range(rt.rank * blocks // rt.world, (rt.rank + 1) * blocks // rt.world)
    done = blocks_done(folder)
    todo = [b for b in mine if not done[b]]

    def count(bs):
        return sum(min(B, windows - b * B) * T for b in bs)
    if rt.master and len(todo) < len(mine):
        print(f"resuming: {len(mine) - len(todo)} of this rank's {len(mine)} blocks already on disk")
    models = [m.to(rt.device) for m in teachers]
    hidden = [torch.compile(m.hidden_states) if cfg["compile"] else m.hidden_states for m in models]
    heads = [m.head_weight for m in models]
    log_weights = [math.log(w) for w in weights]
    tokens = data.tokens["train"]
    bar = tqdm(total=count(mine), initial=count(mine) - count(todo), unit="tok", unit_scale=True,
               disable=not rt.master, dynamic_ncols=True, desc=f"rank 0 of {rt.world}")
    writer = Writer(folder, meta)
    try:
        for b in todo:
            n = min(B, windows - b * B)
            x = torch.from_numpy(tokens[b * B * T:(b * B + n) * T].astype("int64")).view(n, T)
            values, ids, _ = teacher_rows(hidden, heads, log_weights, x.to(rt.device), meta["vocab_size"],
                                       meta["top_k"], rt.autocast)
            writer.put(b, values, ids)
            bar.update(n * T)
    finally:
        writer.close()
        bar.close()


def write_remote(endpoint, data, folder, meta):
    """The blocks not yet on disk, a window per request, asked in block order; a block is written
    once all of its windows are in. Whether every block is on disk (not when max_requests ran out)."""
    from tqdm import tqdm

    B, T, windows, k = meta["batch_size"], meta["block_size"], meta["windows"], meta["top_k"]
    done = blocks_done(folder)
    todo = [b for b in range(blocks_of(meta)) if not done[b]]
    tokens = data.tokens["train"]

    def score(w):
        sent = tokens[w * T:w * T + T + 1].astype("int64").tolist()
        answer = endpoint.complete(prompt=sent, max_tokens=0, echo=True, logprobs=k,
                                   extra_body=dict(return_tokens_as_token_ids=True))
        return prompt_top_k(answer, sent, k, meta["vocab_size"], endpoint.base)

    def windows_of(b):
        return range(b * B, min(windows, (b + 1) * B))
    got, writer = {}, Writer(folder, meta)
    bar = tqdm(total=len(todo), unit="block", dynamic_ncols=True)
    try:
        for w, rows in endpoint.map(score, (w for b in todo for w in windows_of(b))):
            got[w] = rows
            block = windows_of(w // B)
            if all(v in got for v in block):
                parts = [got.pop(v) for v in block]
                writer.put(w // B, torch.from_numpy(np.concatenate([v for v, _ in parts])),
                           torch.from_numpy(np.concatenate([i for _, i in parts])))
                bar.update()
    finally:
        writer.close()
        bar.close()
    return bar.n == len(todo)


def local_teacher(cfg, rt, data):
    """(identity, write(folder, meta) -> whether every block is on disk) of teacher=."""
    teachers, weights, identity = load_teachers(cfg["teacher"], data)
    for source, model in zip(identity["sources"], teachers):
        if cfg["block_size"] > model.config.block_size:
            raise UserError(f"block_size={cfg['block_size']} exceeds teacher {source}'s context "
                            f"{model.config.block_size}")

    def write_blocks(folder, meta):
        write(cfg, rt, data, teachers, weights, folder, meta)
        return True
    return identity, write_blocks


def remote_teacher(cfg, rt, data):
    """The same for api_base= and model=."""
    if rt.world > 1:
        raise UserError("api_base= runs in one process; use concurrency= rather than torchrun")
    endpoint = Endpoint(cfg)
    return remote_identity(cfg["api_base"], cfg["model"]), lambda folder, meta: write_remote(endpoint, data, folder, meta)


def main(cfg):
    rt = Runtime(cfg)
    try:
        data = BinDataset(cfg["dataset"])
        check(cfg, data)
        identity, write_blocks = (remote_teacher if cfg["api_base"] else local_teacher)(cfg, rt, data)
        meta = make_meta(identity, data, cfg["block_size"], cfg["top_k"], cfg["cache_dtype"],
                         cfg["batch_size"], cfg["windows"])
        folder = cfg["out"] or os.path.join(data.dir, f"teacher_{meta['id']}")
        action = plan(folder, meta, cfg["overwrite"])
        if action == "complete":
            if rt.master:
                print(f"{folder} already holds this cache, complete")
            return
        rt.all_sum(0.0)  # every rank has read the folder before rank 0 changes it
        if action == "new" and rt.master:
            create(folder, meta)
        rt.all_sum(0.0)
        if not write_blocks(folder, meta):
            print(f"max_requests={cfg['max_requests']} spent: {int(blocks_done(folder).sum())} of "
                  f"{blocks_of(meta)} blocks in {folder}; rerun the same command to continue")
            return
        rt.all_sum(0.0)
        if rt.master:
            finish(folder, meta)
            size = sum(meta["files"].values())
            print(f"wrote {folder}: {meta['tokens']:,} tokens, {meta['bytes_per_token']} bytes per "
                  f"token, {size / 2**20:,.1f} MiB; distill with teacher_cache={folder}")
    finally:
        rt.close()


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
