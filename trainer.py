"""The one training loop, shared by train.py and distill.py.

A script builds the model and a `loss_fn(model, x, y) -> (loss, parts)`; `train()` does the rest:
DDP, gradient accumulation, AdamW, warmup + cosine/linear decay, clipping, autocast, evaluation,
exact resume, checkpoints, metrics.jsonl, the progress bar and wandb.
"""
import contextlib
import json
import math
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import lora
from configurator import OUT_DIR, UserError, format_config

# keys every training script has; train.py and distill.py add their own. The comment beside a key
# is its doc (`python train.py help` shows it)
DEFAULTS = dict(
    # I/O
    out_dir="out/run",  # the run's folder: checkpoints and metrics.jsonl
    init_from="scratch",  # scratch, resume (out_dir's run), or a checkpoint, HF folder or GPT-2 name
    overwrite=False,  # start over in an out_dir that holds a run (its checkpoints are removed)
    keep_last=2,  # step checkpoints kept on disk (best.pt besides)
    eval_interval=250,  # steps between val loss estimates, each followed by a checkpoint
    eval_iters=20,  # batches per val loss estimate
    log_interval=10,  # steps between training records in metrics.jsonl
    final_eval=True,  # at the end, score every token of the val split exactly
    wandb_log=False,  # mirror metrics.jsonl to wandb (offline mode works)
    wandb_project="nanodistill",  # wandb project
    wandb_run_name="",  # wandb run name; empty: wandb picks one
    # data
    dataset="data/shakespeare_char",  # a folder written by a prepare/ script
    batch_size=12,  # rows per micro-step on each rank
    block_size=256,  # tokens per row: the context length
    gradient_accumulation_steps=1,  # micro-steps per optimizer step, over all ranks together
    # model, when built from scratch: a GPT-2 name or the sizes below
    model="",  # gpt2, gpt2-medium, gpt2-large or gpt2-xl sizes; empty: n_layer, n_head, n_embd
    n_layer=6, n_head=6, n_embd=384,  # blocks, attention heads, width
    dropout=0.0,  # dropout probability in attention, MLP and embeddings
    bias=True,  # biases in Linear and LayerNorm layers, as GPT-2 has
    # AdamW and schedule
    learning_rate=6e-4,  # peak learning rate, reached after warmup_iters
    max_iters=5000,  # optimizer steps in all (a resumed run counts the steps already done)
    weight_decay=0.1,  # AdamW weight decay, on matrices only
    beta1=0.9, beta2=0.95,  # AdamW moment decay rates
    grad_clip=1.0,  # clip the gradient norm to this; 0: no clipping
    warmup_iters=100,  # steps of linear warmup
    lr_decay_iters=0,  # step at which the decay reaches min_lr; 0: max_iters
    min_lr=6e-5,  # learning rate at the end of the decay
    decay="cosine",  # shape of the decay after warmup
    # fine-tuning controls
    freeze_layers=0,  # freeze the embeddings and the first N blocks
    layer_lr_decay=1.0,  # lr x this per block below the top (Howard & Ruder 2018); 1: off
    label_smoothing=0.0,  # share of the target probability spread over the vocabulary
    gradient_checkpointing=False,  # recompute activations in the backward pass: less memory, more time
    lora_rank=0,  # LoRA adapters of this rank on a trained model; 0: train every weight
    lora_alpha=16.0,  # LoRA scale: the update is alpha / rank x B A
    lora_dropout=0.0,  # dropout on the LoRA adapters' input
    lora_targets="attn,attn_proj,mlp,mlp_proj",  # comma-separated layers that get adapters
    # losses
    chunk_rows=0,  # rows per chunk of the chunked CE/KD losses; 0: about 4M logits a chunk
    # system
    device="auto",  # auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps
    dtype="auto",  # autocast dtype; auto: bfloat16 on GPUs that have it, float16 on others, float32 on CPU
    compile=False,  # torch.compile the model
    seed=1337,  # seed of the initialisation and of the batches drawn
    max_bad_steps=10,  # non-finite steps in a row (skipped) before the run stops
)
DTYPES = ("auto", "float32", "bfloat16", "float16")
# the values a key may take, where that is plain (configurator.describe): checked before any work
LIMITS = dict(
    out_dir=OUT_DIR, keep_last="[1, inf)", eval_interval="[1, inf)", eval_iters="[1, inf)",
    log_interval="[1, inf)", batch_size="[1, inf)", block_size="[1, inf)",
    gradient_accumulation_steps="[1, inf)", n_layer="[1, inf)", n_head="[1, inf)", n_embd="[1, inf)",
    dropout="[0, 1)", learning_rate="(0, inf)", max_iters="[0, inf)", weight_decay="[0, inf)",
    beta1="[0, 1)", beta2="[0, 1)", grad_clip="[0, inf)", warmup_iters="[0, inf)",
    lr_decay_iters="[0, inf)", min_lr="[0, inf)", decay=("cosine", "linear", "constant"),
    freeze_layers="[0, inf)", layer_lr_decay="(0, 1]", label_smoothing="[0, 1)", lora_rank="[0, inf)",
    lora_alpha="(0, inf)", lora_dropout="[0, 1)", chunk_rows="[0, inf)",
    dtype=DTYPES, seed="[0, inf)", max_bad_steps="[0, inf)",
)


# ---------------------------------------------------------------- system


def resolve_device(device):
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


class Runtime:
    """Process group, device and precision of this process."""

    def __init__(self, cfg):
        self.ddp = int(os.environ.get("RANK", -1)) != -1
        cfg["device"] = resolve_device(cfg["device"])
        if self.ddp:
            self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
            backend = "nccl" if cfg["device"].startswith("cuda") else "gloo"
            if backend == "nccl":
                cfg["device"] = f"cuda:{self.local_rank}"
                torch.cuda.set_device(cfg["device"])
            dist.init_process_group(backend=backend)
        else:
            self.rank, self.world, self.local_rank = 0, 1, 0
        self.master = self.rank == 0
        self.device = cfg["device"]
        self.device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        if cfg["dtype"] == "auto":
            cfg["dtype"] = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") \
                if self.device_type == "cuda" else "float32"
        self.dtype = cfg["dtype"]
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"dtype={self.dtype!r}: use float32, bfloat16 or float16")
        if self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def autocast(self):
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=getattr(torch, self.dtype))

    def all_mean(self, *values):
        """Mean over ranks of a few floats (one all-reduce); the values themselves without DDP."""
        if self.ddp:
            t = torch.tensor(values, dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            values = (t / self.world).tolist()
        return values[0] if len(values) == 1 else values

    def close(self):
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()


def measure_peak_flops(device, dtype=torch.float32, n=2048, repeats=5):
    """FLOP/s of a large square matmul on this device: the ceiling MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if a.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if a.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


# ---------------------------------------------------------------- optimizer and schedule


def lr_at(step, cfg):
    """Linear warmup, then cosine or linear decay to min_lr at lr_decay_iters (default max_iters)."""
    lr, warmup = cfg["learning_rate"], cfg["warmup_iters"]
    end = cfg["lr_decay_iters"] or cfg["max_iters"]
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if cfg["decay"] == "constant" or step >= end:
        return lr if cfg["decay"] == "constant" else cfg["min_lr"]
    progress = (step - warmup) / max(1, end - warmup)
    if cfg["decay"] == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg["min_lr"] + coeff * (lr - cfg["min_lr"])


def _layer_of(name, n_layer):
    """Depth of a parameter for layer-wise LR decay: embeddings 0, block i -> i+1, head n+1."""
    if ".h." in name:
        return int(name.split(".h.")[1].split(".")[0]) + 1
    if "wte" in name or "wpe" in name:
        return 0
    return n_layer + 1


def freeze(model, n_blocks):
    """Freeze embeddings and the first n_blocks blocks (the LM head is tied to wte: frozen too)."""
    if n_blocks <= 0:
        return
    for name, p in model.named_parameters():
        if "wte" in name or "wpe" in name or _layer_of(name, model.config.n_layer) <= n_blocks:
            p.requires_grad_(False)


def make_optimizer(model, cfg, device_type):
    """AdamW; weight decay on matrices only (not biases, LayerNorms); with layer_lr_decay < 1 each
    depth gets lr * decay^(n_layer + 1 - depth) (Howard & Ruder 2018; Clark et al. 2020)."""
    n = model.config.n_layer
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2
        depth = _layer_of(name, n) if cfg["layer_lr_decay"] != 1.0 else n + 1
        key = (depth, decay)
        if key not in groups:
            groups[key] = dict(params=[], weight_decay=cfg["weight_decay"] if decay else 0.0,
                               lr_scale=cfg["layer_lr_decay"] ** (n + 1 - depth), depth=depth)
        groups[key]["params"].append(p)
    if not groups:
        raise UserError("no trainable parameters (check freeze_layers / lora settings)")
    # fused AdamW has CUDA and CPU kernels: one pass per tensor instead of ~8 (6x384 on CPU: the
    # optimizer step goes from 1.73 s to 0.60 s)
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(list(groups.values()), lr=cfg["learning_rate"],
                             betas=(cfg["beta1"], cfg["beta2"]), fused=fused)


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def estimate_loss(model, data, cfg, rt, split):
    """Mean CE over eval_iters fixed batches (the same batches at every eval)."""
    model.eval()
    losses = []
    for i in range(cfg["eval_iters"]):
        x, y = data.batch(split, cfg["batch_size"], cfg["block_size"], cfg["seed"] + 1, i, 0,
                          rt.world, rt.rank)
        with rt.autocast():
            _, loss = model(x.to(rt.device), y.to(rt.device))
        losses.append(loss.item())
    model.train()
    return rt.all_mean(float(np.mean(losses)))


@torch.no_grad()
def tokens_loss(model, tokens, block_size, batch_size, device="cpu", autocast=None, stride=None,
                mask=None, progress=False):
    """Exact token-weighted CE over every target of a token array: (mean loss, tokens scored)."""
    from tqdm import tqdm

    from data import windows
    model.eval()
    total, count = 0.0, 0
    V = model.config.vocab_size
    batches = windows(tokens, block_size, batch_size, stride, mask)
    for x, y in tqdm(batches, unit="batch", leave=False, dynamic_ncols=True, disable=not progress):
        x, y = x.to(device), y.to(device)
        with autocast or contextlib.nullcontext():
            logits, _ = model(x)
        total += F.cross_entropy(logits[..., :V].float().reshape(-1, V), y.reshape(-1),
                                 ignore_index=-1, reduction="sum").item()
        count += int((y >= 0).sum())
    return total / max(count, 1), count


def split_loss(model, data, split, block_size, batch_size, device="cpu", autocast=None, stride=None):
    return tokens_loss(model, data.tokens[split], block_size, batch_size, device, autocast, stride,
                       data.masks.get(split))


# ---------------------------------------------------------------- the loop


class Stop:
    """SIGTERM/SIGINT ask the loop to checkpoint and exit after the current step; a second one
    (e.g. torchrun giving up on a rank stuck in a collective) exits at once."""

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.signal is not None:
            self.restore()
            signal.raise_signal(signum)
        self.signal = signal.Signals(signum).name

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Metrics:
    """metrics.jsonl on rank 0 (records after a resumed step are dropped), mirrored to wandb."""

    def __init__(self, cfg, rt, resume_step):
        self.path = os.path.join(cfg["out_dir"], "metrics.jsonl")
        self.on = rt.master
        self.wandb = None
        if not self.on:
            return
        os.makedirs(cfg["out_dir"], exist_ok=True)
        if resume_step is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            keep = []
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:
                        break  # a torn last line: the process died mid-write
                    if record["step"] <= resume_step:
                        keep.append(line)
            with open(self.path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(self.path + ".tmp", self.path)
        if cfg["wandb_log"]:
            import wandb
            self.wandb = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"] or None,
                                    config=cfg, resume="allow")

    def log(self, record):
        if not self.on:
            return
        # non-finite values become null: JSON has no NaN
        record = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])


def state_dict_of(model):
    """What a checkpoint stores of the model: all weights, or only the adapters of a LoRA model."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return lora.adapter_state(model) if getattr(model, "lora_info", None) else model.state_dict()


def train(cfg, model, data, loss_fn, rt, resume=None, extra_state=None):
    """Train `model` on `data` with `loss_fn(model, x, y) -> (loss, {name: tensor})`.

    resume: a loaded checkpoint to continue from exactly. extra_state: plain values stored in every
    checkpoint (e.g. the tokenizer). Returns the final (exact) val loss or None.
    """
    from tqdm import tqdm

    if cfg["decay"] not in ("cosine", "linear", "constant"):
        raise UserError(f"decay={cfg['decay']!r}: use cosine, linear or constant")
    accum = cfg["gradient_accumulation_steps"]
    if (cfg["batch_size"] * accum) % rt.world or accum % rt.world:
        raise UserError(f"gradient_accumulation_steps={accum} must be divisible by the world size "
                        f"{rt.world} (each rank runs accum/world micro-steps of batch_size rows)")
    micro_steps = accum // rt.world
    raw = model
    optimizer = make_optimizer(raw, cfg, rt.device_type)
    scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")
    step, best_val, clock = 0, float("inf"), 0.0  # clock: training seconds, across resumes
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        step, best_val, clock = resume["step"], resume["best_val_loss"], resume.get("elapsed", 0.0)
        _set_rng(resume["rng"])
    else:
        torch.manual_seed(cfg["seed"] + rt.rank)
    if cfg["compile"]:
        model = torch.compile(model)
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)

    tokens_per_step = cfg["batch_size"] * cfg["block_size"] * accum
    flops_per_step = raw.flops_per_token(cfg["block_size"]) * tokens_per_step
    peak = measure_peak_flops(rt.device, torch.float32 if rt.dtype == "float32" else getattr(torch, rt.dtype)) \
        if rt.master else 0.0
    metrics = Metrics(cfg, rt, step if resume is not None else None)
    stop = Stop()
    if rt.master:
        trainable = sum(p.numel() for p in raw.parameters() if p.requires_grad)
        print(f"config:\n{format_config(cfg)}")
        print(f"model: {raw.num_params() / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable "
              f"({100 * trainable / raw.num_params():.2f}%); {tokens_per_step} tokens per step; "
              f"world size {rt.world}; {rt.device} {rt.dtype}")

    t_start = time.perf_counter()

    def elapsed():
        return clock + time.perf_counter() - t_start

    def save(best=False):
        if not rt.master:
            return
        state = dict(model=state_dict_of(raw), optimizer=optimizer.state_dict(),
                     scaler=scaler.state_dict(), config=cfg, model_args=raw.config.to_dict(),
                     step=step, best_val_loss=best_val, rng=_get_rng(), data_step=step, elapsed=elapsed(),
                     lora=getattr(raw, "lora_info", None),
                     **(extra_state or {}))
        checkpoint.save(state, cfg["out_dir"], step, cfg["keep_last"], best=best)

    def evaluate():
        nonlocal best_val
        val = estimate_loss(model, data, cfg, rt, "val")
        best = val < best_val
        best_val = min(best_val, val)
        metrics.log(dict(step=step, val_loss=val, val_ppl=math.exp(min(val, 50)), time=elapsed()))
        save(best)
        return val

    bar = tqdm(total=cfg["max_iters"], initial=step, disable=not rt.master, dynamic_ncols=True,
               mininterval=1.0, desc=os.path.basename(cfg["out_dir"].rstrip("/")))
    bad_steps = 0
    t_last, last_logged = time.perf_counter(), step
    try:  # the signal handlers are ours only while the loop runs
        model.train()
        while step < cfg["max_iters"]:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            loss_sum, parts_sum = 0.0, {}
            for micro in range(micro_steps):
                x, y = data.batch("train", cfg["batch_size"], cfg["block_size"], cfg["seed"], step,
                                  micro, rt.world, rt.rank)
                x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                sync = not rt.ddp or micro == micro_steps - 1  # all-reduce once per step, not per micro
                with (contextlib.nullcontext() if sync else model.no_sync()), rt.autocast():
                    loss, parts = loss_fn(model, x, y)
                scaler.scale(loss / micro_steps).backward()
                loss_sum += loss.item() / micro_steps
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v) / micro_steps
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg["grad_clip"] or float("inf"))
            # one all-reduce gives every rank the same loss and the same stop decision
            loss_all, stopping = rt.all_mean(loss_sum, float(stop.signal is not None))
            if math.isfinite(loss_all) and torch.isfinite(norm):
                scaler.step(optimizer)
                bad_steps = 0
            else:
                bad_steps += 1
                metrics.log(dict(step=step + 1, skipped=True, bad_steps=bad_steps, loss=loss_all,
                                 grad_norm=float(norm)))
                if bad_steps > cfg["max_bad_steps"]:
                    raise UserError(f"{bad_steps} non-finite steps in a row at step {step + 1} (loss "
                                    f"{loss_all}, grad norm {float(norm)}): lower learning_rate or "
                                    f"check the data; the last good checkpoint is in {cfg['out_dir']}")
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            if (step % cfg["log_interval"] == 0 or step == cfg["max_iters"]) and not bad_steps:
                now = time.perf_counter()
                dt = (now - t_last) / (step - last_logged)
                last_logged, t_last = step, now
                tok_s = tokens_per_step / dt
                mfu = flops_per_step / dt / peak if peak else 0.0
                record = dict(step=step, loss=loss_all, lr=lr, grad_norm=float(norm), tok_s=tok_s, mfu=mfu,
                              time=elapsed())
                if parts_sum:
                    means = rt.all_mean(*parts_sum.values())
                    record.update(zip(parts_sum, means if len(parts_sum) > 1 else [means]))
                metrics.log(record)
                bar.set_postfix(loss=f"{loss_all:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}",
                                mfu=f"{100 * mfu:.1f}%", refresh=False)
            if step % cfg["eval_interval"] == 0 and step < cfg["max_iters"]:
                evaluate()
            if stopping:
                save()
                bar.close()
                if rt.master:
                    print(f"stopped by {stop.signal or 'a signal to another rank'} at step {step}; checkpoint saved in "
                          f"{cfg['out_dir']}; continue with init_from=resume")
                return None
    finally:
        stop.restore()
    bar.close()
    evaluate()
    if not cfg["final_eval"]:
        return None
    val, n = split_loss(raw, data, "val", cfg["block_size"], cfg["batch_size"], rt.device, rt.autocast())
    if rt.master:
        metrics.log(dict(step=step, final_val_loss=val, final_val_ppl=math.exp(min(val, 50)),
                         val_tokens=n))
        print(f"final val loss {val:.4f} (ppl {math.exp(min(val, 50)):.2f}) over all {n} val tokens")
    return val


def _get_rng():
    np_state = np.random.get_state()
    state = dict(python=random.getstate(), torch=torch.get_rng_state(),
                 numpy=[np_state[0], np_state[1].tolist(), *np_state[2:]])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state):
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------- building the model to train


def init_model(cfg, data, rt):
    """The model named by init_from, on rt.device: (model, checkpoint to resume from or None)."""
    from model import GPT, GPT2_SIZES, GPTConfig

    init, out_dir = cfg["init_from"], cfg["out_dir"]
    resume = None
    if init == "scratch":
        if checkpoint.is_checkpoint(out_dir) and not cfg["overwrite"]:
            raise UserError(f"{out_dir} already holds a run's checkpoint; use init_from=resume to "
                            f"continue it, another out_dir, or overwrite=True to start over")
        if cfg["model"] and cfg["model"] not in GPT2_SIZES:
            raise UserError(f"model={cfg['model']!r}: use one of {', '.join(GPT2_SIZES)} or set "
                            f"n_layer/n_head/n_embd")
        sizes = GPT2_SIZES.get(cfg["model"]) or dict(n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                                                     n_embd=cfg["n_embd"])
        if sizes["n_embd"] % sizes["n_head"]:
            raise UserError(f"n_embd={sizes['n_embd']} is not divisible by n_head={sizes['n_head']}")
        torch.manual_seed(cfg["seed"])
        model = GPT(GPTConfig(**sizes, block_size=cfg["block_size"], vocab_size=data.vocab_size,
                              bias=cfg["bias"], dropout=cfg["dropout"]))
    elif init == "resume":
        resume = checkpoint.load(out_dir)
        if "optimizer" not in resume:
            raise UserError(f"{out_dir} holds weights without training state (a converted model?): "
                            f"fine-tune from it with init_from={out_dir} and another out_dir")
        model = checkpoint.model_from_checkpoint(resume, merge_lora=False)
    else:
        model, tokenizer, _ = checkpoint.load_model(init, dropout=cfg["dropout"])
        if tokenizer.get("tokenizer") != data.meta.get("tokenizer"):
            raise UserError(f"{init} uses the {tokenizer.get('tokenizer')} tokenizer but "
                            f"{cfg['dataset']} was prepared with {data.meta.get('tokenizer')}")
    if cfg["block_size"] > model.config.block_size:
        raise UserError(f"block_size={cfg['block_size']} exceeds the model's context "
                        f"{model.config.block_size}")
    data.check(model.config.vocab_size, cfg["block_size"])
    if cfg["lora_rank"] and resume is None:
        if init == "scratch":
            raise UserError("LoRA adapts a trained model: set init_from to a checkpoint, HF folder or GPT-2 name")
        lora.apply(model, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"])
        model.lora_info = dict(base=init, rank=cfg["lora_rank"], alpha=cfg["lora_alpha"],
                               dropout=cfg["lora_dropout"], targets=cfg["lora_targets"])
    model.gradient_checkpointing = cfg["gradient_checkpointing"]
    freeze(model, cfg["freeze_layers"])
    if init == "scratch" and cfg["overwrite"] and rt.master:
        checkpoint.clear(out_dir)  # only now, after every check has passed
    return model.to(rt.device), resume
