"""Pretrain from scratch, fine-tune GPT-2 or a checkpoint, or resume: the shared loop with plain CE.

    python train.py config/shakespeare_char.py
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_large.py
    python train.py config/shakespeare_char.py init_from=resume
"""
from configurator import run
from data import BinDataset
from losses import ce_loss_fn
from runtime import Runtime
from trainer import DEFAULTS, LIMITS, init_model, train


def main(cfg):
    rt = Runtime(cfg)
    try:
        data = BinDataset(cfg["dataset"], cfg["train_windows"])
        model, resume = init_model(cfg, data, rt)
        loss_fn = ce_loss_fn(model.config.vocab_size, cfg["label_smoothing"], cfg["chunk_rows"])
        train(cfg, model, data, loss_fn, rt, resume, extra_state=dict(tokenizer=data.tokenizer))
    finally:
        rt.close()


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
