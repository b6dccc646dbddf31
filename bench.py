"""Speed and memory of a train step, a distill step and generation, against a peak measured on this
machine and side by side with transformers' GPT2LMHeadModel in the same run.

    python bench.py                                   # the 6x384 model, fp32 on CPU, bf16 on CUDA
    python bench.py compile=True parts=train,distill
    python bench.py parts=generate gen_batch=32 gen_batch_tokens=256     # engine vs transformers generate
    python bench.py dtype=bfloat16 n_layer=12 n_head=12 n_embd=768 block_size=1024 batch_size=16
    python bench.py parts=cached,cache_write          # distilling from a teacher cache, writing one
    python bench.py parts=serve serve_clients=32 serve_requests=20   # serve.py's app under concurrent clients

Each figure is the median of up to `repeats` timed calls after `warmup` untimed ones, with min and
max. Variants compared by a ratio are timed round-robin in one loop, so a change in machine load
(other processes on a shared CPU) falls on both sides alike; a loop stops early once its timed calls
have taken max_time seconds (n in the table says how many ran). MFU = achieved / measured peak
FLOP/s, with training FLOPs per token 6N + 12·L·C·T (N = parameters without the position table).

Distill step: distill_step is a step of distill.py's default hybrid loss (alpha 0.5, forward KL, T 2)
to a teacher of teacher_n_layer blocks, student_step the same student's CE step, teacher_forward
what that step's teacher computes: its hidden states, then its logits / T formed block by block as
the soft loss forms them. Not forward(), which writes all B*T rows of logits at once and, on a CPU,
pays for faulting in a fresh 400 MB tensor that the distill step never allocates; so distill /
(student + teacher) is what the soft loss's own passes over the logits add.

Vocab: vocab_size is the tokenizer's; our model pads its embedding to a multiple of 64 as it does in
training (50257 -> 50304), the transformers model uses vocab_size as is. Both compute the same loss
over the real columns only, from the same batches, with the same AdamW and grad clipping.

Generation (greedy) runs engine.py and transformers' `generate` on the same weights (a transformers
model saved and loaded as users load HF GPT-2, vocab unpadded): batch 1 at each of gen_tokens new
tokens, against the bound memory sets on decoding one token at a time (every weight read once per
token: weight bytes / measured read bandwidth), and gen_batch rows x gen_batch_tokens new tokens.

Serving: serve.py's app (HTTP, batcher, engine) in a thread of this process, serve_clients client
threads each sending serve_requests seeded completions of serve_tokens new tokens one after the
other: requests/s, new tokens/s and the latency percentiles of a request. Clients and server share
this process's interpreter, so the figures are a lower bound of a server on its own.
"""
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

import checkpoint
import engine
from configurator import OUT_FILE, UserError, run
from inputs import comma_list, timestamped
import scoring
import teacher_cache
from losses import (cached_kd_loss_fn, ce_loss_fn, default_chunk_rows, hard_loss, kd_loss_fn,
                    teacher_logit_chunks)
from model import GPT, GPTConfig
from optim import apply_gradients, make_optimizer
from runtime import DTYPE_CHOICES, Runtime, measure_peak_flops

DEFAULTS = dict(
    n_layer=6, n_head=6, n_embd=384,  # the student: blocks, attention heads, width
    block_size=256,  # tokens per row
    batch_size=8,  # rows per step
    vocab_size=50257,  # the tokenizer's vocabulary (ours pads it to a multiple of 64)
    teacher_n_layer=12, teacher_n_head=6, teacher_n_embd=384,  # the distill step's teacher
    chunk_rows=0,  # rows per chunk of the CE and KD losses; 0: about 4M logits, as train.py/distill.py
    top_k=64,  # the teacher cache of the cached and cache_write parts: top-k kept per token
    cache_dtype="float16",  # ... and the dtype of its log-probabilities
    cache_blocks=4,  # blocks of batch_size windows per timed cache write
    cache_dir="",  # where cache_write writes (its disk is part of the figure); empty: the temp dir
    device="auto",  # auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps
    dtype="auto",  # auto: bfloat16 on CUDA, float32 on CPU (float16 steps through a grad scaler)
    compile=False,  # torch.compile both implementations
    threads=0,  # CPU threads; 0: torch's default
    warmup=1,  # untimed calls before the timed ones
    repeats=3,  # timed calls, at most
    max_time=60.0,  # seconds of timed calls after which a loop stops early
    gen_tokens=(128, 512),  # new tokens of each batch-1 generation run timed
    gen_batch=32,  # rows of the batched generation run ...
    gen_batch_tokens=256,  # ... and the new tokens of each of its rows
    prompt_len=16,  # prompt tokens before generation
    serve_clients=32,  # concurrent clients of the serve part ...
    serve_requests=20,  # ... the completions each sends, one after the other ...
    serve_tokens=32,  # ... and the new tokens of each
    parts="train,distill,generate,memory,cached,cache_write,serve",  # comma-separated parts to run
    hf=True,  # time transformers' GPT2LMHeadModel beside ours
    out="",  # the JSON results; empty: out/bench/<timestamp>.json
    seed=0,  # seed of the weights and the batches
)
LIMITS = dict(
    n_layer="[1, inf)", n_head="[1, inf)", n_embd="[1, inf)", block_size="[1, inf)", batch_size="[1, inf)",
    vocab_size="[1, inf)", teacher_n_layer="[1, inf)", teacher_n_head="[1, inf)", teacher_n_embd="[1, inf)",
    chunk_rows="[0, inf)", dtype=DTYPE_CHOICES, threads="[0, inf)", warmup="[0, inf)", repeats="[1, inf)",
    max_time="(0, inf)", gen_tokens="[1, inf)", gen_batch="[1, inf)", gen_batch_tokens="[1, inf)",
    prompt_len="[1, inf)", out=OUT_FILE, seed="[0, inf)", top_k="[0, inf)", cache_dtype=tuple(teacher_cache.DTYPES),
    cache_blocks="[1, inf)", serve_clients="[1, inf)", serve_requests="[1, inf)", serve_tokens="[1, inf)",
)
PARTS = ("train", "distill", "generate", "memory", "cached", "cache_write", "serve")
OPTIM = dict(learning_rate=6e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, layer_lr_decay=1.0)
KD = dict(alpha=0.5, kind="forward_kl", temperature=2.0)  # distill.py's defaults
FLOP_FORMULA = "training FLOPs/token = 6N + 12*L*C*T (N: parameters minus position embeddings)"


# ---------------------------------------------------------------- building blocks


def student_config(cfg, block_size=None):
    return GPTConfig(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                     block_size=block_size or cfg["block_size"], vocab_size=cfg["vocab_size"])


def teacher_model(cfg, device):
    teacher = GPT(GPTConfig(n_layer=cfg["teacher_n_layer"], n_head=cfg["teacher_n_head"],
                            n_embd=cfg["teacher_n_embd"], block_size=cfg["block_size"],
                            vocab_size=cfg["vocab_size"]))
    return teacher.to(device).eval().requires_grad_(False)


def hf_model(cfg, n_positions):
    import transformers
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"], n_positions=n_positions,
        vocab_size=cfg["vocab_size"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="sdpa"))


def flops_per_token(model, cfg, T):
    """6N + 12LCT, our count for either implementation: the transformers model is ours unpadded."""
    if not isinstance(model, GPT):
        config = student_config(cfg)
        config.pad_vocab_to = 1
        with torch.device("meta"):
            model = GPT(config)
    return model.flops_per_token(T)


def ce(cfg, hf=False):
    if not hf:
        return ce_loss_fn(cfg["vocab_size"], chunk_rows=cfg["chunk_rows"])

    def loss_fn(model, x, y):
        # transformers' own loss: F.cross_entropy over float32 logits. The KV cache it builds by
        # default is of no use when training: leave it out
        return hard_loss(model(x, use_cache=False).logits, y, cfg["vocab_size"]), {}
    return loss_fn


def kd(cfg, teacher):
    return kd_loss_fn(teacher, cfg["vocab_size"], KD["alpha"], KD["kind"], KD["temperature"],
                      chunk_rows=cfg["chunk_rows"], compile_teacher=cfg["compile"])


def make_step(model, loss_fn, x, y, rt):
    """One training step as trainer.train takes it: forward, loss, (scaled) backward, clip, AdamW."""
    optimizer = make_optimizer(model, OPTIM, rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with rt.autocast():
            loss, _ = loss_fn(model, x, y)
        scaler.scale(loss).backward()
        apply_gradients(optimizer, scaler, params, OPTIM["learning_rate"], 1.0)
    return step, optimizer


def batch(cfg, device):
    g = torch.Generator().manual_seed(cfg["seed"])
    shape = (cfg["batch_size"], cfg["block_size"])
    x = torch.randint(0, cfg["vocab_size"], shape, generator=g)
    y = torch.randint(0, cfg["vocab_size"], shape, generator=g)
    return x.to(device), y.to(device)


def maybe_compile(model, cfg):
    return torch.compile(model) if cfg["compile"] else model


# ---------------------------------------------------------------- timing


def timed(fns, cfg, sync, warm=None):
    """{name: fn} -> {name: [seconds]}, timed round-robin (see the module docstring)."""
    for _ in range(cfg["warmup"]):
        for fn in (warm or fns).values():
            fn()
    times = {name: [] for name in fns}
    spent = 0.0
    for _ in range(cfg["repeats"]):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
            spent += times[name][-1]
        if spent >= cfg["max_time"]:
            break
    return times


def summary(seconds, work=None):
    """Median/min/max of a list of durations, or of work/duration when work is given."""
    if work is None:
        vals = dict(median=statistics.median(seconds), min=min(seconds), max=max(seconds))
    else:
        vals = dict(median=work / statistics.median(seconds), min=work / max(seconds), max=work / min(seconds))
    return dict(vals, n=len(seconds), seconds=[round(s, 5) for s in seconds])


# ---------------------------------------------------------------- the parts


def bench_train(cfg, rt, sync, hf_ok):
    x, y = batch(cfg, rt.device)
    T, tokens = cfg["block_size"], cfg["batch_size"] * cfg["block_size"]
    models = {"ours": GPT(student_config(cfg)).to(rt.device)}
    if hf_ok:
        models["transformers"] = hf_model(cfg, T).to(rt.device)
    steps = {name: make_step(maybe_compile(m, cfg), ce(cfg, hf=name != "ours"), x, y, rt)[0]
             for name, m in models.items()}
    times = timed(steps, cfg, sync)
    result = {}
    for name, m in models.items():
        tok_s = summary(times[name], tokens)
        fpt = flops_per_token(m, cfg, T)
        result[name] = dict(tokens_per_s=tok_s, flops_per_token=fpt, params=sum(p.numel() for p in m.parameters()))
    if hf_ok:
        result["ratio_ours_over_hf"] = result["ours"]["tokens_per_s"]["median"] / \
            result["transformers"]["tokens_per_s"]["median"]
    return result


def bench_distill(cfg, rt, sync):
    x, y = batch(cfg, rt.device)
    tokens = cfg["batch_size"] * cfg["block_size"]
    torch.manual_seed(cfg["seed"])
    teacher = teacher_model(cfg, rt.device)  # kd_loss_fn compiles what it calls when cfg asks
    hidden = torch.compile(teacher.hidden_states) if cfg["compile"] else teacher.hidden_states
    distilled = maybe_compile(GPT(student_config(cfg)).to(rt.device), cfg)
    plain = maybe_compile(GPT(student_config(cfg)).to(rt.device), cfg)
    chunk = cfg["chunk_rows"] or default_chunk_rows(cfg["vocab_size"])

    @torch.no_grad()
    def teacher_forward():
        # what the distill step's teacher computes: its hidden states, then its logits / T in the
        # blocks the soft loss forms them in (forward() would write all B*T rows of logits at once)
        with rt.autocast():
            h = hidden(x)
            for _ in teacher_logit_chunks(h.reshape(-1, h.size(-1)), teacher.head_weight,
                                          cfg["vocab_size"], KD["temperature"], chunk):
                pass

    fns = {"distill_step": make_step(distilled, kd(cfg, teacher), x, y, rt)[0],
           "student_step": make_step(plain, ce(cfg), x, y, rt)[0],
           "teacher_forward": teacher_forward}
    times = timed(fns, cfg, sync)
    result = {name: dict(seconds=summary(t), tokens_per_s=summary(t, tokens)) for name, t in times.items()}
    parts = statistics.median(times["student_step"]) + statistics.median(times["teacher_forward"])
    result["ratio_distill_over_sum"] = statistics.median(times["distill_step"]) / parts
    result["kd"] = dict(loss="hybrid (distill.py's defaults)", **KD, chunk_rows=chunk, rows=tokens,
                        chunked=chunk < tokens)
    return result


def cache_rows(cfg, teacher, x, rt):
    """scoring.teacher_rows of one teacher: what cache_teacher.py computes for a block."""
    return scoring.teacher_rows([teacher.hidden_states], [teacher.head_weight], [0.0], x,
                                cfg["vocab_size"], cfg["top_k"], rt.autocast)[:2]


def bench_cached(cfg, rt, sync):
    """A distill step from a teacher cache (no teacher in memory) against a CE step: the cached
    tensors are a real teacher's top-k in cache_dtype, as CachedDataset hands them over."""
    x, y = batch(cfg, rt.device)
    tokens = cfg["batch_size"] * cfg["block_size"]
    torch.manual_seed(cfg["seed"])
    values, ids = cache_rows(cfg, teacher_model(cfg, rt.device), x, rt)
    cached = [values.to(teacher_cache.DTYPES[cfg["cache_dtype"]][1]).view(*x.shape, -1)]
    if ids is not None:
        cached.append(ids.long().view(*x.shape, -1))
    kd_fn = cached_kd_loss_fn(cfg["vocab_size"], KD["alpha"], KD["kind"], KD["temperature"],
                              chunk_rows=cfg["chunk_rows"])
    fns = {"cached_step": make_step(maybe_compile(GPT(student_config(cfg)).to(rt.device), cfg),
                                    lambda m, x, y: kd_fn(m, x, y, *cached), x, y, rt)[0],
           "ce_step": make_step(maybe_compile(GPT(student_config(cfg)).to(rt.device), cfg), ce(cfg), x, y, rt)[0]}
    times = timed(fns, cfg, sync)
    result = {name: dict(seconds=summary(t), tokens_per_s=summary(t, tokens)) for name, t in times.items()}
    result["ratio_cached_over_ce"] = statistics.median(times["cached_step"]) / statistics.median(times["ce_step"])
    result["cache"] = dict(top_k=cfg["top_k"], cache_dtype=cfg["cache_dtype"], **KD)
    return result


def bench_cache_write(cfg, rt, sync):
    """Writing a cache (teacher forward, top-k on the device, the writer thread's pwrite + fsync)
    against the teacher's bare forward to logits, over the same cache_blocks blocks."""
    B, T = cfg["batch_size"], cfg["block_size"]
    torch.manual_seed(cfg["seed"])
    teacher = teacher_model(cfg, rt.device)
    g = torch.Generator().manual_seed(cfg["seed"])
    xs = [torch.randint(0, cfg["vocab_size"], (B, T), generator=g).to(rt.device) for _ in range(cfg["cache_blocks"])]
    meta = teacher_cache.layout(cfg["vocab_size"], T, cfg["top_k"], cfg["cache_dtype"], B, B * len(xs))

    @torch.no_grad()
    def forward():
        for x in xs:
            with rt.autocast():
                teacher(x)
    with tempfile.TemporaryDirectory(prefix="bench_cache_", dir=cfg["cache_dir"] or None) as folder:
        teacher_cache.create(folder, meta)

        def write():
            writer = teacher_cache.Writer(folder, meta)
            for b, x in enumerate(xs):
                writer.put(b, *cache_rows(cfg, teacher, x, rt))
            writer.close()  # the last block fsynced: the figure counts the data on disk
        times = timed({"cache_write": write, "teacher_forward": forward}, cfg, sync)
    tokens = B * T * len(xs)
    result = {name: dict(tokens_per_s=summary(t, tokens)) for name, t in times.items()}
    result["ratio_write_over_forward"] = result["cache_write"]["tokens_per_s"]["median"] / \
        result["teacher_forward"]["tokens_per_s"]["median"]
    result["cache"] = dict(top_k=cfg["top_k"], cache_dtype=cfg["cache_dtype"], blocks=len(xs),
                           bytes_per_token=meta["bytes_per_token"], folder=os.path.dirname(folder))
    return result


def bench_generate(cfg, rt, sync, hf_ok):
    # a context of at least 1024 so the longest run never slides its window
    block = max(1024, cfg["prompt_len"] + max(*cfg["gen_tokens"], cfg["gen_batch_tokens"]))
    torch.manual_seed(cfg["seed"])
    hf = None
    if hf_ok:
        hf = hf_model(cfg, block).eval()
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            ours = checkpoint.load_model(folder, rt.device)[0].eval()
        hf.to(rt.device)
    else:
        ours = GPT(student_config(cfg, block)).to(rt.device).eval()
    g = torch.Generator().manual_seed(cfg["seed"])
    prompts = torch.randint(0, cfg["vocab_size"], (cfg["gen_batch"], cfg["prompt_len"]), generator=g).to(rt.device)

    def runs(rows, n):
        p = prompts[:rows]
        fns = {"engine": lambda: engine.generate(ours, p.tolist(), n, temperature=0)}
        if hf is not None:
            # min_new_tokens keeps a randomly initialised model from stopping at its EOS token
            fns["transformers"] = lambda: hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n,
                                                      min_new_tokens=n, do_sample=False, pad_token_id=0)
        return fns

    def row(rows, n):
        # warm-up with short runs: the kernels are the same, and the long ones cost the most
        times = timed(runs(rows, n), cfg, sync, warm=runs(rows, min(n, 8)))
        r = {name: summary(t, n * rows) for name, t in times.items()}
        if hf is not None:
            r["ratio_engine_over_hf"] = r["engine"]["median"] / r["transformers"]["median"]
        return r

    weight_bytes = decode_bytes(ours)
    bandwidth = measure_bandwidth(rt.device, weight_bytes, sync)
    with torch.no_grad(), rt.autocast():
        decode = {str(n): row(1, n) for n in cfg["gen_tokens"]}
        batch = row(cfg["gen_batch"], cfg["gen_batch_tokens"])
    # a busy host can depress one measurement of the ceiling: keep the best of before and after
    bandwidth = max(bandwidth, measure_bandwidth(rt.device, weight_bytes, sync))
    bound = bandwidth / weight_bytes
    for r in decode.values():
        r["engine_over_bound"] = r["engine"]["median"] / bound
    return dict(block_size=block, prompt_len=cfg["prompt_len"], greedy=True, compiled=False,
                weight_bytes=weight_bytes, bandwidth=bandwidth, bound_tokens_per_s=bound, decode=decode,
                batch=dict(rows=cfg["gen_batch"], new_tokens=cfg["gen_batch_tokens"], **batch))


def bench_serve(cfg, rt):
    """Requests/s and latency of the app serve.py runs, under serve_clients concurrent clients."""
    import httpx

    from server import SETTINGS, InThread, build
    from tokenizer import GPT2Tokenizer
    torch.manual_seed(cfg["seed"])
    model = GPT(student_config(cfg, max(cfg["block_size"], cfg["prompt_len"] + cfg["serve_tokens"])))
    model = model.to(rt.device).eval()
    # GPT-2's tokenizer decodes whatever ids below 50257 the model writes; any vocab_size runs
    served = InThread(build(model, GPT2Tokenizer(), rt, "bench", SETTINGS))
    g = torch.Generator().manual_seed(cfg["seed"])
    prompts = torch.randint(0, cfg["vocab_size"], (cfg["serve_clients"], cfg["prompt_len"]), generator=g).tolist()
    latencies, failed = [], []

    def client(k):
        with httpx.Client(base_url=served.url, timeout=600) as c:
            for j in range(cfg["serve_requests"]):
                t = time.perf_counter()
                r = c.post("/completions", json=dict(model="bench", prompt=prompts[k], max_tokens=cfg["serve_tokens"],
                                                     temperature=1.0, seed=k * cfg["serve_requests"] + j))
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != cfg["serve_tokens"]:
                    failed.append(r.text[:200])
    try:
        httpx.post(served.url + "/completions", json=dict(model="bench", prompt=prompts[0], max_tokens=2))  # warm
        clients = [threading.Thread(target=client, args=(k,)) for k in range(cfg["serve_clients"])]
        t0 = time.perf_counter()
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        served.close()
    n = len(latencies)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if n > 1 else latencies * 99
    return dict(clients=cfg["serve_clients"], requests=n, new_tokens=cfg["serve_tokens"], prompt_len=cfg["prompt_len"],
                batch_rows=SETTINGS["batch_rows"], failed=len(failed), wall_s=wall, requests_per_s=n / wall,
                tokens_per_s=n * cfg["serve_tokens"] / wall,
                latency_s=dict(p50=statistics.median(latencies), p99=cuts[98], max=max(latencies)))


def decode_bytes(model):
    """Bytes of weights a batch-1 decoding step reads: every stored parameter once (the tied token
    embedding as the LM head's matrix), less the tables of which it reads one row (positions, an
    untied token embedding)."""
    return model.num_params(non_embedding=True) * next(model.parameters()).element_size()


def measure_bandwidth(device, nbytes, sync, repeats=10):
    """Bytes/s of summing a float32 tensor of nbytes, best of `repeats`. Sized as the weights and
    read again and again as decoding reads them, it meets the same level of the memory hierarchy: a
    CPU whose last-level cache holds the weights (480 MB of L3 on some Xeons) serves both from it."""
    x = torch.ones(max(nbytes // 4, 1), device=device)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        x.sum()
        sync()
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best


def bench_memory(cfg, rt):
    rows = cfg["batch_size"] * cfg["block_size"]
    chunk = cfg["chunk_rows"] or default_chunk_rows(cfg["vocab_size"])
    if chunk >= rows:
        raise UserError(f"a soft-loss chunk of {chunk} rows is not below batch_size*block_size={rows}: "
                        f"the chunked memory variant would not chunk; lower chunk_rows")
    result = {}
    for variant in ("ce", "ce_checkpointed", "chunked", "unchunked"):
        child = dict(cfg, device=rt.device, dtype=rt.dtype, variant=variant)
        p = subprocess.run([sys.executable, "-c", "import sys, bench; bench.memory_child(sys.argv[1])",
                            json.dumps(child)], cwd=os.path.dirname(os.path.abspath(__file__)),
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"memory variant {variant} failed:\n{p.stderr[-3000:]}")
        result[variant] = json.loads(p.stdout.strip().splitlines()[-1])
    ce_peak = result["ce"]["step_bytes"]
    result["ratio_chunked_over_ce"] = result["chunked"]["step_bytes"] / ce_peak
    result["ratio_unchunked_over_ce"] = result["unchunked"]["step_bytes"] / ce_peak
    result["ratio_checkpointed_over_ce"] = result["ce_checkpointed"]["step_bytes"] / ce_peak
    result["method"] = result["ce"]["method"]
    result["compiled"] = False  # eager in every case: compiling three fresh processes costs minutes
    return result


def memory_child(cfg_json):
    """One step of one variant in a fresh process: the bytes it needs above the resident model,
    teacher and optimizer state. On CPU a process's peak RSS is the only honest figure for what
    a step touches, and it cannot be reset for a single variant other than by a fresh process."""
    cfg = json.loads(cfg_json)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    rt = Runtime(cfg)
    x, y = batch(cfg, rt.device)
    torch.manual_seed(cfg["seed"])
    student = GPT(student_config(cfg)).to(rt.device)
    student.gradient_checkpointing = cfg["variant"] == "ce_checkpointed"
    if cfg["variant"] in ("ce", "ce_checkpointed"):
        step, optimizer = make_step(student, ce(cfg), x, y, rt)
    else:
        if cfg["variant"] == "unchunked":
            cfg["chunk_rows"] = 1 << 62
        step, optimizer = make_step(student, kd(cfg, teacher_model(cfg, rt.device)), x, y, rt)
    # AdamW allocates its moments on the first step: make them resident before the baseline
    for p in student.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    base, method = _memory_baseline(rt)
    step()
    peak = _memory_peak(rt, method)
    print(json.dumps(dict(step_bytes=peak - base, baseline_bytes=base, method=method)))


def _memory_baseline(rt):
    if rt.device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated(), "cuda max_memory_allocated - memory_allocated before the step"
    try:
        # "5" resets the peak-RSS mark (Linux >= 4.0); ru_maxrss of a child process can instead
        # hold its parent's peak, inherited through fork/exec
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS"), "VmHWM after the step - VmRSS before it (peak mark reset at the baseline)"
    except OSError:
        return _rss_now_fallback(), "ru_maxrss after the step - ru_maxrss before it"


def _memory_peak(rt, method):
    if rt.device_type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _proc_status("VmHWM") if method.startswith("VmHWM") else _rss_now_fallback()


def _proc_status(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _rss_now_fallback():
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ---------------------------------------------------------------- report


def _fmt_rate(s, pct=False):
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:,.1f}")
    return f"{f(s['median']):>12} {f(s['min']):>12} {f(s['max']):>12}"


def _seconds_rows(r, names):
    return [f"  {name:36}{r[name]['seconds']['median']:>12.3f} {r[name]['seconds']['min']:>12.3f} "
            f"{r[name]['seconds']['max']:>12.3f}  {r[name]['seconds']['n']}" for name in names]


def _gen_rows(label, row):
    lines = [f"  {label + ', ' + name:36}{_fmt_rate(row[name])}  {row[name]['n']}"
             for name in ("engine", "transformers") if name in row]
    if "ratio_engine_over_hf" in row:
        lines.append(f"  {label}: engine / transformers {row['ratio_engine_over_hf']:.2f}x")
    return lines


def report(res):
    lines = [f"device {res['env']['device']} ({res['env']['cpu']}), {res['env']['dtype']}, "
             f"compile={res['config']['compile']}, threads {res['env']['threads']}, "
             f"load avg {res['env']['load_avg_start']} -> {res['env']['load_avg_end']}",
             f"measured peak {res['peak_flops'] / 1e9:,.1f} GFLOP/s ({res['peak_method']}); {FLOP_FORMULA}"]
    head = f"{'':38}{'median':>12} {'min':>12} {'max':>12}  n"
    if "train" in res:
        r = res["train"]
        lines += ["", f"train step (B={res['config']['batch_size']}, T={res['config']['block_size']})", head]
        for name in ("ours", "transformers"):
            if name in r:
                lines.append(f"  {name + ' tokens/s':36}{_fmt_rate(r[name]['tokens_per_s'])}  {r[name]['tokens_per_s']['n']}")
                lines.append(f"  {name + ' MFU':36}{_fmt_rate(r[name]['mfu'], pct=True)}")
        if "ratio_ours_over_hf" in r:
            lines.append(f"  ours / transformers tokens/s: {r['ratio_ours_over_hf']:.2f}x")
    if "distill" in res:
        r = res["distill"]
        lines += ["", f"distill step (teacher {res['config']['teacher_n_layer']}x{res['config']['teacher_n_embd']}, "
                      f"chunk_rows={r['kd']['chunk_rows']} of {r['kd']['rows']} rows), seconds", head]
        lines += _seconds_rows(r, ("distill_step", "student_step", "teacher_forward"))
        lines.append(f"  distill / (student step + teacher forward): {r['ratio_distill_over_sum']:.3f}")
    if "cached" in res:
        r = res["cached"]
        lines += ["", f"distill step from a teacher cache (top_k={r['cache']['top_k']}, "
                      f"{r['cache']['cache_dtype']}) vs CE step, seconds", head]
        lines += _seconds_rows(r, ("cached_step", "ce_step"))
        lines.append(f"  cached distill / CE step: {r['ratio_cached_over_ce']:.3f}")
    if "cache_write" in res:
        r = res["cache_write"]
        lines += ["", f"teacher cache writing vs the teacher's bare forward, tokens/s "
                      f"({r['cache']['blocks']} blocks, {r['cache']['bytes_per_token']} bytes/token "
                      f"to {r['cache']['folder']})", head]
        for name in ("cache_write", "teacher_forward"):
            lines.append(f"  {name:36}{_fmt_rate(r[name]['tokens_per_s'])}  {r[name]['tokens_per_s']['n']}")
        lines.append(f"  cache writing / bare forward: {r['ratio_write_over_forward']:.3f}")
    if "memory" in res:
        r = res["memory"]
        lines += ["", f"peak memory of one step above the resident model and optimizer ({r['method']})"]
        for name in ("ce", "ce_checkpointed", "chunked", "unchunked"):
            lines.append(f"  {name:36}{r[name]['step_bytes'] / 2**20:>12,.0f} MiB")
        lines.append(f"  chunked / CE {r['ratio_chunked_over_ce']:.2f}x, unchunked / CE {r['ratio_unchunked_over_ce']:.2f}x, "
                     f"CE with gradient checkpointing / CE {r['ratio_checkpointed_over_ce']:.2f}x")
    if "generate" in res:
        r = res["generate"]
        lines += ["", f"generation tokens/s (greedy, same weights, prompt {r['prompt_len']}, "
                      f"block_size {r['block_size']}, eager)", head]
        for n, row in r["decode"].items():
            lines += _gen_rows(f"batch 1, {n} new", row)
            lines.append(f"  batch 1, {n} new: engine at {100 * row['engine_over_bound']:.0f}% of the bound")
        lines.append(f"  bound {r['bound_tokens_per_s']:,.1f} tokens/s = {r['weight_bytes'] / 1e6:,.1f} MB of "
                     f"weights per token / {r['bandwidth'] / 1e9:,.1f} GB/s measured (sum of a tensor that size)")
        b = r["batch"]
        lines += _gen_rows(f"batch {b['rows']} x {b['new_tokens']} new", b)
    if "serve" in res:
        r = res["serve"]
        lines += ["", f"serving: {r['clients']} clients x {r['requests'] // r['clients']} completions of "
                      f"{r['new_tokens']} new tokens (prompt {r['prompt_len']}, batch_rows {r['batch_rows']})",
                  f"  {r['requests_per_s']:,.1f} requests/s, {r['tokens_per_s']:,.0f} new tokens/s; latency p50 "
                  f"{r['latency_s']['p50']:.3f} s, p99 {r['latency_s']['p99']:.3f} s, max {r['latency_s']['max']:.3f} s; "
                  f"{r['failed']} failed"]
    return "\n".join(lines)


def main(cfg):
    parts = comma_list(cfg["parts"], "parts", choices=PARTS)
    if cfg["top_k"] >= cfg["vocab_size"]:
        raise UserError(f"top_k={cfg['top_k']} must be below vocab_size={cfg['vocab_size']} (0 keeps the whole distribution)")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    rt = Runtime(cfg)
    hf_ok = cfg["hf"]
    if hf_ok and importlib.util.find_spec("transformers") is None:
        print("transformers is not installed: the side-by-side columns are left out")
        hf_ok = False
    sync = torch.cuda.synchronize if rt.device_type == "cuda" else (lambda: None)
    torch.manual_seed(cfg["seed"])
    t0 = time.perf_counter()
    res = dict(config=cfg, env=dict(
        device=rt.device, dtype=rt.dtype, threads=torch.get_num_threads(), torch=torch.__version__,
        transformers=__import__("transformers").__version__ if hf_ok else None,
        cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
        load_avg_start=[round(v, 2) for v in os.getloadavg()]), flop_formula=FLOP_FORMULA)
    def peak():
        return measure_peak_flops(rt.device, getattr(torch, rt.dtype), repeats=10)
    res["peak_flops"] = peak()
    res["peak_method"] = f"best of 10 square {rt.dtype} matmuls, n=2048, before and after the train step"
    for part in PARTS:
        if part not in parts:
            continue
        print(f"running {part} ...", flush=True)
        if part == "train":
            res["train"] = bench_train(cfg, rt, sync, hf_ok)
            # a busy host can depress one measurement of the ceiling: keep the best seen
            res["peak_flops"] = max(res["peak_flops"], peak())
            for name in ("ours", "transformers") if hf_ok else ("ours",):
                r = res["train"][name]
                fpt = r["flops_per_token"] / res["peak_flops"]
                r["mfu"] = {k: r["tokens_per_s"][k] * fpt for k in ("median", "min", "max")}
        elif part == "distill":
            res["distill"] = bench_distill(cfg, rt, sync)
        elif part == "generate":
            res["generate"] = bench_generate(cfg, rt, sync, hf_ok)
        elif part == "cached":
            res["cached"] = bench_cached(cfg, rt, sync)
        elif part == "cache_write":
            res["cache_write"] = bench_cache_write(cfg, rt, sync)
        elif part == "serve":
            res["serve"] = bench_serve(cfg, rt)
        else:
            res["memory"] = bench_memory(cfg, rt)
    res["env"]["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    res["wall_s"] = time.perf_counter() - t0
    print(report(res))
    out = cfg["out"] or timestamped(os.path.join("out", "bench"), ".json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {out} ({res['wall_s']:.0f} s)")


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
