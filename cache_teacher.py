"""Run a teacher (or an ensemble) once over a prepared dataset's train split and keep, per target
token, its top-k log-probabilities and the log of the rest's mass: every student, every epoch,
then distills from disk without the teacher's forward pass.

    python cache_teacher.py teacher=out/teacher dataset=data/shakespeare_char block_size=256 top_k=0
    python cache_teacher.py teacher=gpt2-large dataset=data/openwebtext block_size=1024 top_k=64
    python cache_teacher.py teacher=out/a,out/b,0.7,0.3 dataset=data/babylm   # a 0.7/0.3 mixture
    torchrun --standalone --nproc_per_node=8 cache_teacher.py teacher=gpt2-large ...
    python distill.py ... teacher_cache=data/<name>/teacher_<id>               # then train from it

A killed run continues where it stopped when rerun with the same arguments (under any number of
ranks), and the finished files are byte for byte an uninterrupted run's. teacher_cache.py holds
the format.
"""
import math
import os

import torch

from configurator import OUT_DIR, UserError, run
from data import BinDataset
from runtime import DTYPE_CHOICES, Runtime
from scoring import teacher_rows
from teacher_cache import DTYPES, Writer, blocks_done, blocks_of, create, finish, load_teachers, \
    make_meta, plan

DEFAULTS = dict(
    teacher="",  # our out_dir / ckpt.pt, a HF GPT-2 folder or name; a,b[,wa,wb]: their mixture
    dataset="data/shakespeare_char",  # a prepared dataset; its train split is cached
    block_size=256,  # the student's context: windows of this many targets
    top_k=64,  # tokens kept per target; 0 keeps the whole distribution (small vocabularies)
    cache_dtype="float16",  # float16, bfloat16, or float32 (exactness checks)
    batch_size=16,  # windows per teacher forward; fixes the blocks a rerun resumes at
    out="",  # the cache folder; default <dataset>/teacher_<id>
    overwrite=False,  # replace a cache of other settings in out
    device="auto",  # auto (cuda if available, else cpu), cpu, cuda, cuda:N
    dtype="auto",  # the teacher's autocast: bfloat16 where CUDA has it, float32 on CPU
    compile=False,  # torch.compile the teacher
)
LIMITS = dict(top_k="[0, inf)", cache_dtype=tuple(DTYPES), batch_size="[1, inf)", block_size="[1, inf)", out=OUT_DIR,
              dtype=DTYPE_CHOICES)


def check(cfg, data):
    if not cfg["teacher"]:
        raise UserError("teacher= is required: an out_dir, HF folder or GPT-2 name, or several "
                        "as a,b[,weight_a,weight_b]")
    if cfg["top_k"] >= data.vocab_size:
        raise UserError(f"top_k={cfg['top_k']} must be below the vocabulary ({data.vocab_size}); "
                        f"top_k=0 keeps the whole distribution")
    if cfg["block_size"] >= len(data.tokens["train"]):
        raise UserError(f"block_size={cfg['block_size']} must be below the train "
                        f"split's {len(data.tokens['train'])} tokens")


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


def main(cfg):
    rt = Runtime(cfg)
    try:
        data = BinDataset(cfg["dataset"])
        check(cfg, data)
        teachers, weights, identity = load_teachers(cfg["teacher"], data)
        for source, model in zip(identity["sources"], teachers):
            if cfg["block_size"] > model.config.block_size:
                raise UserError(f"block_size={cfg['block_size']} exceeds teacher {source}'s context "
                                f"{model.config.block_size}")
        meta = make_meta(identity, data, cfg["block_size"], cfg["top_k"], cfg["cache_dtype"],
                         cfg["batch_size"])
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
        write(cfg, rt, data, teachers, weights, folder, meta)
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
