"""Knowledge distillation: the training loop of train.py with a frozen teacher and a soft loss.

    python distill.py config/distill_shakespeare_char.py teacher=out/shakespeare_teacher
    torchrun --standalone --nproc_per_node=8 distill.py config/distill_gpt2_large_to_small.py
    python distill.py config/distill_shakespeare_char.py teacher_cache=data/shakespeare_char/teacher_<id>

teacher_cache: the teacher's predictions written once by cache_teacher.py; no teacher runs (or is
loaded, unless teacher= is also given, which is then checked to be the cache's teacher).

distill_type: output = plain CE on teacher-written data (no teacher at train time);
              logit  = soft loss only;  hybrid = alpha * CE + (1 - alpha) * soft.

on_policy: that share of each micro-batch's rows is written by the student itself from prompts
(window prefixes, or prompts= JSONL) and scored by the teacher on the generated tokens alone
(onpolicy.py; GKD, Agarwal et al. 2024). The cross-entropy of hybrid applies to the dataset's
rows only: the student's text has no ground truth.

    python distill.py config/distill_shakespeare_char.py teacher=out/t on_policy=0.5 kd_loss=reverse_kl
"""
import torch

import checkpoint
from configurator import UserError, run
from data import BinDataset
from evaluation import own_samples_kl
from inputs import comma_list
from losses import KINDS, cached_kd_loss_fn, kd_loss_fn
from onpolicy import OnPolicyData, on_policy_loss_fn, read_prompts, rows_of
from runtime import Runtime
from teacher_cache import CachedDataset, TeacherCache, load_teachers
from tokenizer import check_same
from trainer import DEFAULTS as TRAIN_DEFAULTS
from trainer import LIMITS as TRAIN_LIMITS
from trainer import init_model, train

DEFAULTS = dict(
    TRAIN_DEFAULTS,
    teacher="",  # our out_dir or .pt, a HF folder (GPT-2, Llama, Qwen2), or a GPT-2 name
    teacher_dtype="float32",  # the teacher's weights in memory: float32, or bfloat16 / float16 (half the bytes)
    distill_type="hybrid",  # output: CE on teacher-written data; logit: soft loss only; hybrid: both
    alpha=0.5,  # weight of the hard (CE) loss in hybrid mode; the soft loss gets 1 - alpha
    temperature=2.0,  # softens both distributions; the soft loss is scaled by T^2
    kd_loss="forward_kl",  # the soft loss: KL(teacher||student), KL(student||teacher) or JSD
    jsd_beta=0.5,  # JSD's mixture weight of the teacher
    alpha_cos=0.0,  # weight of DistilGPT2's cosine loss on last hidden states (needs equal widths)
    student_init="",  # teacher_layers: copy embeddings, final norm, head and teacher_layers' blocks; empty: init_from
    teacher_cache="",  # a cache_teacher.py folder to distill from instead of running the teacher
    teacher_layers="",  # teacher blocks to copy, e.g. 0,2,4,7,9,11; empty: evenly spaced, ends kept
    on_policy=0.0,  # share of each micro-batch's rows the student writes itself from prompts; 0: off
    prompt_len=32,  # on-policy prompts: the first prompt_len tokens of the drawn windows (unless prompts=)
    prompts="",  # on-policy prompts from a JSONL file ({"prompt": text} a line) instead of the windows
    sample_temperature=1.0,  # temperature the student samples its own text at; 0: greedy
    final_own_kl=0,  # final eval: the student's KL to the teacher on what it writes from this many val prefixes
)
LIMITS = dict(
    TRAIN_LIMITS, distill_type=("output", "logit", "hybrid"), alpha="[0, 1]", temperature="(0, inf)",
    kd_loss=KINDS, jsd_beta="(0, 1)", alpha_cos="[0, inf)",
    student_init=("", "teacher_layers"), teacher_dtype=("float32", "bfloat16", "float16"),
    on_policy="[0, 1]", prompt_len="[1, inf)", sample_temperature="[0, inf)", final_own_kl="[0, inf)",
)


def load_teacher(cfg, data, rt):
    if not cfg["teacher"]:
        raise UserError(f"distill_type={cfg['distill_type']} needs teacher=<out_dir | HF folder | gpt2 name>")
    # a HF teacher is read straight into tensors of teacher_dtype: its weights are never held twice
    teacher, tok, _ = checkpoint.load_model(cfg["teacher"], rt.device, dtype=getattr(torch, cfg["teacher_dtype"]))
    check_same(f"teacher {cfg['teacher']}", tok, f"dataset {cfg['dataset']}", data.tokenizer,
               "teacher and student must share one tokenizer")
    if cfg["block_size"] > teacher.config.block_size:
        raise UserError(f"block_size={cfg['block_size']} exceeds the teacher's context "
                        f"{teacher.config.block_size}")
    teacher.eval().requires_grad_(False)
    return teacher


def default_layers(n_teacher, n_student):
    """Evenly spaced, first and last kept: 12 -> 6 gives 0,2,4,7,9,11 as DistilGPT2 took (Sanh et al. 2019)."""
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def init_from_teacher_layers(student, teacher, layers_spec):
    t = teacher.config.n_layer
    layers = comma_list(layers_spec, "teacher_layers", convert=int) or default_layers(t, student.config.n_layer)
    if len(layers) != student.config.n_layer or not all(0 <= i < t for i in layers):
        raise UserError(f"teacher_layers={layers} must name n_layer={student.config.n_layer} blocks of "
                        f"the teacher's {t}")
    student.init_from_layers(teacher, layers)
    return layers


def check(cfg):
    """What LIMITS cannot say: combinations of keys."""
    if cfg["teacher_cache"] and cfg["distill_type"] == "output":
        raise UserError("teacher_cache= holds the teacher's distributions: use distill_type=logit "
                        "or hybrid (output distillation trains on text alone)")
    if cfg["teacher_cache"] and cfg["alpha_cos"] > 0:
        raise UserError("alpha_cos needs the teacher's hidden states, which a teacher cache does not "
                        "hold: set alpha_cos=0")
    own = [k for k in ("on_policy", "final_own_kl") if cfg[k]]
    if own and cfg["teacher_cache"]:
        raise UserError(f"{own[0]} needs a live teacher to score the student's own text, which a teacher "
                        f"cache does not hold: drop teacher_cache= (and give teacher=) or set {own[0]}=0")
    if own and cfg["distill_type"] == "output":
        raise UserError(f"{own[0]} needs a teacher to score the student's own text; distill_type=output "
                        f"runs none: use distill_type=logit or hybrid, or set {own[0]}=0")
    if cfg["prompts"] and not cfg["on_policy"]:
        raise UserError("prompts= are the prompts of on-policy rows: set on_policy above 0, or drop prompts=")
    uses_prefixes = (cfg["on_policy"] and not cfg["prompts"]) or cfg["final_own_kl"]
    if uses_prefixes and cfg["prompt_len"] >= cfg["block_size"]:
        raise UserError(f"prompt_len={cfg['prompt_len']} leaves nothing of block_size={cfg['block_size']} "
                        f"for the student to write: lower prompt_len")
    if cfg["final_own_kl"] and not cfg["final_eval"]:
        raise UserError("final_own_kl is part of the final eval: set final_eval=True or final_own_kl=0")
    if cfg["on_policy"]:
        rows_of(cfg["on_policy"], cfg["batch_size"])


def open_cache(cfg, data):
    """The training data with the cached teacher's tensors in every batch, after checking the
    cache against the data, block_size and (when teacher= is given too) the teacher."""
    cache = TeacherCache(cfg["teacher_cache"])
    teacher_id = load_teachers(cfg["teacher"], data)[2] if cfg["teacher"] else None
    cache.check(data, cfg["block_size"], teacher_id)
    return CachedDataset(cfg["dataset"], cache, cfg["train_windows"])


def own_kl(cfg, teacher, data, rt):
    """The final eval's addition: the student's KL to the teacher on continuations it writes of
    final_own_kl val prefixes (evaluation.own_samples_kl), as final_own_* metrics."""
    def metrics(student):
        r = own_samples_kl(student, teacher, data.tokens["val"], cfg["final_own_kl"], cfg["prompt_len"],
                           cfg["block_size"], cfg["seed"], cfg["sample_temperature"], cfg["batch_size"],
                           rt.device, rt.autocast())
        print(f"on its own {r['tokens']} tokens from {cfg['final_own_kl']} val prefixes: KL(student||teacher) "
              f"{r['reverse_kl']:.4f}, KL(teacher||student) {r['forward_kl']:.4f}, "
              f"teacher NLL {r['teacher_nll']:.4f}")
        return {f"final_own_{k}": v for k, v in r.items()}
    return metrics


def main(cfg):
    check(cfg)
    rt = Runtime(cfg)
    try:
        data = BinDataset(cfg["dataset"], cfg["train_windows"])
        # read before any model loads: a mistake in the file should not wait for them
        prompts = read_prompts(cfg["prompts"], data.tokenizer, cfg["block_size"]) if cfg["prompts"] else None
        teacher = None
        if cfg["teacher_cache"]:
            data = open_cache(cfg, data)
        elif cfg["distill_type"] != "output":
            teacher = load_teacher(cfg, data, rt)
        student, resume = init_model(cfg, data, rt)
        if cfg["student_init"] == "teacher_layers" and resume is None:
            if teacher is None:
                teacher = load_teacher(cfg, data, rt)
            layers = init_from_teacher_layers(student, teacher, cfg["teacher_layers"])
            if rt.master:
                print(f"student initialised from teacher blocks {layers}")
        if cfg["alpha_cos"] > 0 and teacher is not None and teacher.config.n_embd != student.config.n_embd:
            raise UserError(f"alpha_cos needs equal widths: student n_embd={student.config.n_embd}, "
                            f"teacher {teacher.config.n_embd}; set alpha_cos=0")
        if cfg["distill_type"] == "output" or cfg["teacher_cache"]:
            teacher = None  # output distillation learns from the text alone, a cached one from disk
        alpha = cfg["alpha"] if cfg["distill_type"] == "hybrid" else 0.0  # logit: CE logged, not learned
        if cfg["teacher_cache"]:
            loss_fn = cached_kd_loss_fn(student.config.vocab_size, alpha, cfg["kd_loss"], cfg["temperature"],
                                        cfg["jsd_beta"], cfg["label_smoothing"], cfg["chunk_rows"])
        else:
            make = on_policy_loss_fn if cfg["on_policy"] else kd_loss_fn
            loss_fn = make(teacher, student.config.vocab_size, alpha, cfg["kd_loss"],
                           cfg["temperature"], cfg["jsd_beta"], cfg["label_smoothing"],
                           cfg["chunk_rows"], cfg["alpha_cos"], compile_teacher=cfg["compile"])
        if cfg["on_policy"]:
            data = OnPolicyData(data, student, rows_of(cfg["on_policy"], cfg["batch_size"]), cfg["prompt_len"],
                                prompts, cfg["sample_temperature"], rt)
        train(cfg, student, data, loss_fn, rt, resume,
              extra_state=dict(tokenizer=data.tokenizer, teacher=cfg["teacher"]),
              final_metrics=own_kl(cfg, teacher, data, rt) if cfg["final_own_kl"] else None)
    finally:
        rt.close()


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
