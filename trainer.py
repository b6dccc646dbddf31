"""The one training loop, shared by train.py and distill.py.

A script builds the model and a `loss_fn(model, x, y, *extra) -> (loss, parts)` (extra: what else
the data's training batches carry, e.g. a teacher cache's tensors); `train()` does the rest:
DDP, gradient accumulation that weighs every counted target alike, AdamW with its schedule and
clipping (optim.py), autocast (runtime.py), evaluation, exact resume (a micro-batch's rows and
dropout masks are drawn from (seed, step, its place in the global batch)), checkpoints,
metrics.jsonl, the progress bar and wandb.
"""
import contextlib
import json
import math
import os
import signal
import time

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import lora
import optim
from configurator import OUT_DIR, UserError, format_config
from evaluation import estimate_loss, perplexity, split_loss
from runtime import DTYPE_CHOICES, measure_peak_flops
from tokenizer import check_same

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
    train_windows=0,  # N > 0: rows are drawn among the first N windows at multiples of block_size (a teacher cache's); 0: anywhere
    # model, when built from scratch: a GPT-2 name or the sizes below
    model="",  # gpt2, gpt2-medium, gpt2-large or gpt2-xl sizes; empty: n_layer, n_head, n_embd
    n_layer=6, n_head=6, n_embd=384,  # blocks, attention heads, width
    dropout=0.0,  # dropout probability in attention, MLP and embeddings
    bias=True,  # biases in Linear and LayerNorm layers, as GPT-2 has
    family="gpt2",  # gpt2 (learned positions, LayerNorm, GELU) or llama (RoPE, RMSNorm, SwiGLU, GQA)
    n_kv_head=0,  # key/value heads; fewer than n_head is grouped-query attention; 0: n_head
    intermediate_size=0,  # MLP width; 0: the family's (gpt2 4*n_embd, llama 8/3*n_embd rounded up to 256)
    rope_theta=10000.0,  # base of the rotary frequencies (llama)
    norm_eps=1e-5,  # epsilon of the LayerNorms / RMSNorms
    tie_embeddings=True,  # the LM head shares the token embedding (gpt2 always; llama usually not)
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
# the values a key may take, where that is plain (configurator.describe): checked before any work
LIMITS = dict(
    out_dir=OUT_DIR, keep_last="[1, inf)", eval_interval="[1, inf)", eval_iters="[1, inf)",
    log_interval="[1, inf)", batch_size="[1, inf)", block_size="[1, inf)", train_windows="[0, inf)",
    gradient_accumulation_steps="[1, inf)", n_layer="[1, inf)", n_head="[1, inf)", n_embd="[1, inf)",
    dropout="[0, 1)", learning_rate="(0, inf)", max_iters="[0, inf)", weight_decay="[0, inf)",
    beta1="[0, 1)", beta2="[0, 1)", grad_clip="[0, inf)", warmup_iters="[0, inf)",
    lr_decay_iters="[0, inf)", min_lr="[0, inf)", decay=optim.DECAYS,
    freeze_layers="[0, inf)", layer_lr_decay="(0, 1]", label_smoothing="[0, 1)", lora_rank="[0, inf)",
    lora_alpha="(0, inf)", lora_dropout="[0, 1)", chunk_rows="[0, inf)",
    dtype=DTYPE_CHOICES, seed="[0, inf)", max_bad_steps="[0, inf)", family=("gpt2", "llama"),
    n_kv_head="[0, inf)", intermediate_size="[0, inf)", rope_theta="(0, inf)", norm_eps="(0, inf)",
)


# ---------------------------------------------------------------- one optimizer step's gradient


def dropout_seed(seed, step, row_block):
    """Seed of the dropout masks (model and LoRA) of one micro-batch. Like the micro-batch's rows
    (data.py) it is a pure function of (seed, step, its place in the global batch): a resumed run,
    whatever else has drawn from the global RNG, draws the masks it would have drawn, and a rank
    draws its own. The trailing 2 keeps this stream apart from the data's [seed, step, split]."""
    return int(np.random.SeedSequence([seed, step, row_block, 2]).generate_state(1, np.uint64)[0])


def micro_batches(data, cfg, step, rt):
    """This rank's share of step `step`'s global batch: one (x, y, dropout seed, *extra) per
    micro-step, on rt.device. extra is whatever else the data's batch carries for the loss (a
    teacher cache's tensors), passed on as loss_fn(model, x, y, *extra)."""
    batches = []
    for micro in range(cfg["gradient_accumulation_steps"] // rt.world):
        x, y, *extra = data.batch("train", cfg["batch_size"], cfg["block_size"], cfg["seed"], step,
                                  micro, rt.world, rt.rank)
        seed = dropout_seed(cfg["seed"], step, micro * rt.world + rt.rank)
        batches.append((*(t.to(rt.device, non_blocking=True) for t in (x, y)), seed,
                        *(t.to(rt.device, non_blocking=True) for t in extra)))
    return batches


def forward_backward(model, loss_fn, batches, rt, scaler):
    """Accumulate one optimizer step's gradient over this rank's micro-batches so that every
    counted target (y >= 0) weighs the same across micro-batches and ranks, as in one big batch.
    loss_fn returns a mean over a micro-batch's counted targets; scaled by that micro-batch's share
    of the step's counted targets (times the world size, as DDP averages over ranks), the means add
    up to the mean over the whole step. Returns this rank's share of the step's loss and of each
    part: their sums over ranks are the step's token-weighted means. A part may instead be a pair
    (mean, n), a mean over n targets of its own (some rows' only, say): it comes back as (sum, n),
    whose sums over ranks divide into its token-weighted mean."""
    counts = [int((batch[1] >= 0).sum()) for batch in batches]
    total = max(rt.all_sum(float(sum(counts))), 1.0)
    loss_sum, parts_sum = 0.0, {}
    for i, ((x, y, seed, *extra), count) in enumerate(zip(batches, counts)):
        torch.manual_seed(seed)
        share = count / total
        sync = not rt.ddp or i == len(batches) - 1  # all-reduce once per step, not per micro
        with (contextlib.nullcontext() if sync else model.no_sync()), rt.autocast():
            loss, parts = loss_fn(model, x, y, *extra)
        scaler.scale(loss * (share * rt.world)).backward()
        loss_sum += loss.item() * share
        for k, v in parts.items():
            if isinstance(v, tuple):
                total_k, n = parts_sum.get(k, (0.0, 0))
                parts_sum[k] = (total_k + float(v[0]) * v[1], n + v[1])
            else:
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v) * share
    return loss_sum, parts_sum


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


class Speed:
    """Tokens/s and MFU (against a matmul peak measured on rank 0) since the last log record."""

    def __init__(self, cfg, model, rt):
        self.tokens = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
        self.flops = model.flops_per_token(cfg["block_size"]) * self.tokens
        self.peak = measure_peak_flops(rt.device, getattr(torch, rt.dtype)) if rt.master else 0.0
        self.since = None

    def start(self, step):
        self.since = (step, time.perf_counter())

    def rates(self, step):
        now = time.perf_counter()
        dt = (now - self.since[1]) / (step - self.since[0])
        self.since = (step, now)
        return dict(tok_s=self.tokens / dt, mfu=self.flops / dt / self.peak if self.peak else 0.0)


def state_dict_of(model):
    """What a checkpoint stores of the model: all weights, or only the adapters of a LoRA model."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return lora.adapter_state(model) if getattr(model, "lora_info", None) else model.state_dict()


class TrainState:
    """What a run carries from step to step and across resumes: optimizer, scaler, step, best val
    loss and training seconds. A checkpoint is this state with the model, config and extra_state.
    Older checkpoints also hold an "rng" entry, which nothing needs any more (dropout_seed)."""

    def __init__(self, cfg, model, rt, resume, extra_state):
        self.cfg, self.model, self.rt, self.extra = cfg, model, rt, extra_state or {}
        self.optimizer = optim.make_optimizer(model, cfg, rt.device_type)
        self.scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == "float16")
        self.step, self.best_val, self.clock = 0, float("inf"), 0.0
        if resume is not None:
            self.optimizer.load_state_dict(resume["optimizer"])
            self.scaler.load_state_dict(resume["scaler"])
            self.step, self.best_val = resume["step"], resume["best_val_loss"]
            self.clock = resume.get("elapsed", 0.0)
        self.started = time.perf_counter()

    def elapsed(self):
        return self.clock + time.perf_counter() - self.started

    def save(self, best=False):
        if not self.rt.master:
            return
        raw = self.model
        state = dict(model=state_dict_of(raw), optimizer=self.optimizer.state_dict(),
                     scaler=self.scaler.state_dict(), config=self.cfg, model_args=raw.config.to_dict(),
                     step=self.step, best_val_loss=self.best_val, elapsed=self.elapsed(),
                     lora=getattr(raw, "lora_info", None), **self.extra)
        checkpoint.save(state, self.cfg["out_dir"], self.step, self.cfg["keep_last"], best=best)

    def evaluate(self, model, data, metrics):
        """Val loss over eval_iters batches, logged, then a checkpoint (best.pt when it improved)."""
        val = estimate_loss(model, data, self.cfg, self.rt, "val")
        best = val < self.best_val
        self.best_val = min(self.best_val, val)
        metrics.log(dict(step=self.step, val_loss=val, val_ppl=perplexity(val), time=self.elapsed()))
        self.save(best)


def check(cfg, rt):
    accum = cfg["gradient_accumulation_steps"]
    if (cfg["batch_size"] * accum) % rt.world or accum % rt.world:
        raise UserError(f"gradient_accumulation_steps={accum} must be divisible by the world size "
                        f"{rt.world} (each rank runs accum/world micro-steps of batch_size rows)")


def wrap(model, cfg, rt):
    if cfg["compile"]:
        model = torch.compile(model)
    if rt.ddp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    return model


def announce(cfg, model, rt, tokens_per_step):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"config:\n{format_config(cfg)}")
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable "
          f"({100 * trainable / model.num_params():.2f}%); {tokens_per_step} tokens per step; "
          f"world size {rt.world}; {rt.device} {rt.dtype}")


def skipped(step, bad_steps, loss, norm, cfg, metrics):
    """Record a step whose update was not applied; give up after max_bad_steps in a row."""
    metrics.log(dict(step=step, skipped=True, bad_steps=bad_steps, loss=loss, grad_norm=norm))
    if bad_steps > cfg["max_bad_steps"]:
        raise UserError(f"{bad_steps} non-finite steps in a row at step {step} (loss {loss}, grad "
                        f"norm {norm}): lower learning_rate or check the data; the last good "
                        f"checkpoint is in {cfg['out_dir']}")


def step_record(state, loss, parts, lr, norm, speed, rt):
    """A training step's metrics line; its parts, this rank's shares (or (sum, n) pairs), summed
    over ranks."""
    record = dict(step=state.step, loss=loss, lr=lr, grad_norm=norm, **speed.rates(state.step),
                  time=state.elapsed())
    if parts:
        values = [x for v in parts.values() for x in (v if isinstance(v, tuple) else (v,))]
        sums = iter(rt.all_sum(*values) if len(values) > 1 else [rt.all_sum(*values)])
        for k, v in parts.items():
            if isinstance(v, tuple):  # (sum, n): a mean over its own targets, none this step is null
                total, n = next(sums), next(sums)
                record[k] = total / n if n else math.nan
            else:
                record[k] = next(sums)
    return record


def final_eval(model, data, cfg, rt, metrics, step, final_metrics=None):
    val, n = split_loss(model, data, "val", cfg["block_size"], cfg["batch_size"], rt.device, rt.autocast())
    if rt.master:
        print(f"final val loss {val:.4f} (ppl {perplexity(val):.2f}) over all {n} val tokens")
        more = final_metrics(model) if final_metrics else {}
        metrics.log(dict(step=step, final_val_loss=val, final_val_ppl=perplexity(val),
                         val_tokens=n, **more))
    return val


def train(cfg, model, data, loss_fn, rt, resume=None, extra_state=None, final_metrics=None):
    """Train `model` on `data` with `loss_fn(model, x, y, *extra) -> (loss, {name: tensor})`, both
    means over the counted targets (y >= 0) of one micro-batch; extra is the rest of what
    data.batch returns for the train split (nothing for a BinDataset).

    resume: a loaded checkpoint to continue from exactly. extra_state: plain values stored in every
    checkpoint (e.g. the tokenizer). final_metrics: a function of the trained model returning a
    dict of further metrics, run on rank 0 after the final eval and logged with it. Returns the
    final (exact) val loss or None.
    """
    from tqdm import tqdm

    check(cfg, rt)
    raw = model
    speed = Speed(cfg, raw, rt)
    metrics = Metrics(cfg, rt, None if resume is None else resume["step"])
    model = wrap(raw, cfg, rt)
    if rt.master:
        announce(cfg, raw, rt, speed.tokens)
    state = TrainState(cfg, raw, rt, resume, extra_state)
    bar = tqdm(total=cfg["max_iters"], initial=state.step, disable=not rt.master, dynamic_ncols=True,
               mininterval=1.0, desc=os.path.basename(cfg["out_dir"].rstrip("/")))
    stop, stopping, bad_steps = Stop(), False, 0
    speed.start(state.step)
    try:  # the signal handlers are ours only while the loop runs
        model.train()
        while state.step < cfg["max_iters"] and not stopping:
            lr = optim.lr_at(state.step, cfg)
            batches = micro_batches(data, cfg, state.step, rt)
            loss, parts = forward_backward(model, loss_fn, batches, rt, state.scaler)
            # one all-reduce gives every rank the same loss and the same stop decision
            loss, stops = rt.all_sum(loss, float(stop.signal is not None))
            stopping = stops > 0
            norm, applied = optim.apply_gradients(state.optimizer, state.scaler, raw.parameters(), lr,
                                                  cfg["grad_clip"], finite=math.isfinite(loss))
            state.step += 1
            bar.update(1)
            bad_steps = 0 if applied else bad_steps + 1
            if bad_steps:
                skipped(state.step, bad_steps, loss, norm, cfg, metrics)
            elif state.step % cfg["log_interval"] == 0 or state.step == cfg["max_iters"]:
                record = step_record(state, loss, parts, lr, norm, speed, rt)
                metrics.log(record)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tok_s']:.0f}",
                                mfu=f"{100 * record['mfu']:.1f}%", refresh=False)
            if state.step % cfg["eval_interval"] == 0 and state.step < cfg["max_iters"]:
                state.evaluate(model, data, metrics)
    finally:
        stop.restore()
        bar.close()
    if stopping:
        state.save()
        if rt.master:
            print(f"stopped by {stop.signal or 'a signal to another rank'} at step {state.step}; checkpoint "
                  f"saved in {cfg['out_dir']}; continue with init_from=resume")
        return None
    state.evaluate(model, data, metrics)
    return final_eval(raw, data, cfg, rt, metrics, state.step, final_metrics) if cfg["final_eval"] else None


# ---------------------------------------------------------------- building the model to train


def init_model(cfg, data, rt):
    """The model named by init_from, on rt.device: (model, checkpoint to resume from or None)."""
    from model import GPT2_SIZES, build

    init, out_dir = cfg["init_from"], cfg["out_dir"]
    resume = None
    if init == "scratch":
        if checkpoint.is_checkpoint(out_dir) and not cfg["overwrite"]:
            raise UserError(f"{out_dir} already holds a run's checkpoint; use init_from=resume to "
                            f"continue it, another out_dir, or overwrite=True to start over")
        if cfg["model"] and (cfg["model"] not in GPT2_SIZES or cfg["family"] != "gpt2"):
            raise UserError(f"model={cfg['model']!r}: use one of {', '.join(GPT2_SIZES)} (with "
                            f"family=gpt2) or set n_layer/n_head/n_embd")
        keys = ("family", "n_layer", "n_head", "n_embd", "n_kv_head", "intermediate_size", "rope_theta",
                "norm_eps", "tie_embeddings", "bias", "dropout", "block_size")
        args = dict({k: cfg[k] for k in keys}, **GPT2_SIZES.get(cfg["model"], {}), vocab_size=data.vocab_size)
        torch.manual_seed(cfg["seed"])
        model = build(args)
    elif init == "resume":
        resume = checkpoint.load(out_dir)
        if "optimizer" not in resume:
            raise UserError(f"{out_dir} holds weights without training state (a converted model?): "
                            f"fine-tune from it with init_from={out_dir} and another out_dir")
        model = checkpoint.model_from_checkpoint(resume, cfg["dropout"], merge_lora=False)
        check_same(f"the run in {out_dir}", checkpoint.tokenizer_of(resume), f"dataset {cfg['dataset']}",
                   data.tokenizer, "resume on the data the run was started on")
    else:
        model, tokenizer, _ = checkpoint.load_model(init, dropout=cfg["dropout"])
        check_same(f"init_from={init}", tokenizer, f"dataset {cfg['dataset']}", data.tokenizer,
                   "fine-tune on data prepared with the model's tokenizer")
    if cfg["block_size"] > model.config.block_size:
        raise UserError(f"block_size={cfg['block_size']} exceeds the model's context "
                        f"{model.config.block_size}")
    data.check(model.config.vocab_size, cfg["block_size"])
    if cfg["lora_rank"] and resume is None:
        if init == "scratch":
            raise UserError("LoRA adapts a trained model: set init_from to a checkpoint, HF folder or GPT-2 name")
        torch.manual_seed(cfg["seed"])  # the adapters' initialisation
        lora.apply(model, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_targets"])
        model.lora_info = dict(base=init, rank=cfg["lora_rank"], alpha=cfg["lora_alpha"],
                               dropout=cfg["lora_dropout"], targets=cfg["lora_targets"])
    model.gradient_checkpointing = cfg["gradient_checkpointing"]
    optim.freeze(model, cfg["freeze_layers"])
    if init == "scratch" and cfg["overwrite"] and rt.master:
        checkpoint.clear(out_dir)  # only now, after every check has passed
    return model.to(rt.device), resume
