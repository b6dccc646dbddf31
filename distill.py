"""Knowledge distillation: the training loop of train.py with a frozen teacher and a soft loss.

    python distill.py config/distill_shakespeare_char.py teacher=out/shakespeare_teacher
    torchrun --standalone --nproc_per_node=8 distill.py config/distill_gpt2_large_to_small.py

distill_type: output = plain CE on teacher-written data (no teacher at train time);
              logit  = soft loss only;  hybrid = alpha * CE + (1 - alpha) * soft.
"""
import torch

import checkpoint
from configurator import UserError, run
from data import BinDataset
from losses import KINDS, cosine_loss, default_chunk_rows, hard_loss, kd_loss
from trainer import DEFAULTS as TRAIN_DEFAULTS
from trainer import LIMITS as TRAIN_LIMITS
from trainer import Runtime, init_model, train

DEFAULTS = dict(
    TRAIN_DEFAULTS,
    teacher="",  # our out_dir or .pt, a HF GPT-2 folder, or a GPT-2 name
    distill_type="hybrid",  # output: CE on teacher-written data; logit: soft loss only; hybrid: both
    alpha=0.5,  # weight of the hard (CE) loss in hybrid mode; the soft loss gets 1 - alpha
    temperature=2.0,  # softens both distributions; the soft loss is scaled by T^2
    kd_loss="forward_kl",  # the soft loss: KL(teacher||student), KL(student||teacher) or JSD
    jsd_beta=0.5,  # JSD's mixture weight of the teacher
    alpha_cos=0.0,  # weight of DistilGPT2's cosine loss on last hidden states (needs equal widths)
    student_init="",  # teacher_layers: copy embeddings, ln_f and teacher_layers' blocks; empty: init_from
    teacher_layers="",  # teacher blocks to copy, e.g. 0,2,4,7,9,11; empty: evenly spaced, ends kept
)
LIMITS = dict(
    TRAIN_LIMITS, distill_type=("output", "logit", "hybrid"), alpha="[0, 1]", temperature="(0, inf)",
    kd_loss=KINDS, jsd_beta="(0, 1)", alpha_cos="[0, inf)",
    student_init=("", "teacher_layers"),
)


def load_teacher(cfg, data, rt):
    if not cfg["teacher"]:
        raise UserError(f"distill_type={cfg['distill_type']} needs teacher=<out_dir | HF folder | gpt2 name>")
    teacher, tok, _ = checkpoint.load_model(cfg["teacher"], rt.device)
    mine = data.tokenizer
    if tok.get("tokenizer") != mine.get("tokenizer") or tok.get("vocab_size") != mine.get("vocab_size") \
            or tok.get("chars") != mine.get("chars"):
        raise UserError(f"teacher {cfg['teacher']} uses tokenizer {tok.get('tokenizer')} (vocab "
                        f"{tok.get('vocab_size')}) but {cfg['dataset']} was prepared with "
                        f"{mine.get('tokenizer')} (vocab {mine.get('vocab_size')}): teacher and "
                        f"student must share one tokenizer")
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


@torch.no_grad()
def init_from_teacher_layers(student, teacher, layers_spec):
    s, t = student.config, teacher.config
    if (s.n_embd, s.n_head) != (t.n_embd, t.n_head):
        raise UserError(f"student_init=teacher_layers needs the teacher's width: student n_embd={s.n_embd} "
                        f"n_head={s.n_head}, teacher n_embd={t.n_embd} n_head={t.n_head}")
    if s.bias != t.bias:
        raise UserError(f"student bias={s.bias} but teacher bias={t.bias}: set bias={t.bias}")
    try:
        layers = [int(i) for i in layers_spec.split(",")] if layers_spec else default_layers(t.n_layer, s.n_layer)
    except ValueError:
        raise UserError(f"teacher_layers={layers_spec!r}: give block numbers separated by commas, "
                        f"e.g. 0,2,4") from None
    if len(layers) != s.n_layer or not all(0 <= i < t.n_layer for i in layers):
        raise UserError(f"teacher_layers={layers} must name n_layer={s.n_layer} blocks of the "
                        f"teacher's {t.n_layer}")
    V = s.vocab_size
    student.transformer.wte.weight[:V] = teacher.transformer.wte.weight[:V]
    student.transformer.wpe.weight.copy_(teacher.transformer.wpe.weight[:s.block_size])
    student.transformer.ln_f.load_state_dict(teacher.transformer.ln_f.state_dict())
    for i, j in enumerate(layers):
        student.transformer.h[i].load_state_dict(teacher.transformer.h[j].state_dict())
    return layers


def kd_loss_fn(cfg, teacher, vocab_size):
    mode, alpha, T = cfg["distill_type"], cfg["alpha"], cfg["temperature"]
    use_cos = cfg["alpha_cos"] > 0
    chunk_rows = cfg["chunk_rows"] or default_chunk_rows(vocab_size)
    if teacher is not None:
        teacher_hidden = torch.compile(teacher.hidden_states) if cfg["compile"] else teacher.hidden_states

    def loss_fn(model, x, y):
        if mode == "output":
            hard = hard_loss(model(x)[0], y, vocab_size, cfg["label_smoothing"], chunk_size=chunk_rows)
            return hard, dict(hard=hard.detach())
        logits, _, h = model(x, return_hidden=True)
        with torch.no_grad():
            t_h = teacher_hidden(x)
        # the teacher's logits are formed chunk by chunk inside the loss, never all at once; the
        # soft loss counts exactly the targets the hard loss counts
        weight = alpha if mode == "hybrid" else 0.0  # logit mode logs the CE but learns without it
        loss, hard, soft = kd_loss(logits, t_h, y, weight, kind=cfg["kd_loss"], temperature=T,
                                   jsd_beta=cfg["jsd_beta"], vocab_size=vocab_size, chunk_size=chunk_rows,
                                   teacher_head=teacher.lm_head.weight, label_smoothing=cfg["label_smoothing"])
        parts = dict(hard=hard, soft=soft)
        if use_cos:
            cos = cosine_loss(h, t_h, y >= 0)
            loss = loss + cfg["alpha_cos"] * cos
            parts["cos"] = cos.detach()
        return loss, parts
    return loss_fn


def main(cfg):
    rt = Runtime(cfg)
    try:
        data = BinDataset(cfg["dataset"])
        teacher = None if cfg["distill_type"] == "output" else load_teacher(cfg, data, rt)
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
        if cfg["distill_type"] == "output":
            teacher = None  # output distillation learns from the text alone
        train(cfg, student, data, kd_loss_fn(cfg, teacher, student.config.vocab_size), rt, resume,
              extra_state=dict(tokenizer=data.tokenizer, teacher=cfg["teacher"]))
    finally:
        rt.close()


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
