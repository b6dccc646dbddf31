"""Pretrain from scratch, fine-tune GPT-2 or a checkpoint, or resume: the shared loop with plain CE.

    python train.py config/shakespeare_char.py
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_large.py
    python train.py config/shakespeare_char.py init_from=resume
"""
from configurator import run
from data import BinDataset
from losses import default_chunk_rows, hard_loss
from trainer import DEFAULTS, LIMITS, Runtime, init_model, train


def ce_loss(cfg, vocab_size):
    # chunked CE: less time and memory at V=50257 (losses.py)
    chunk = cfg["chunk_rows"] or default_chunk_rows(vocab_size)

    def loss_fn(model, x, y):
        return hard_loss(model(x)[0], y, vocab_size, cfg["label_smoothing"], chunk_size=chunk), {}
    return loss_fn


def main(cfg):
    rt = Runtime(cfg)
    try:
        data = BinDataset(cfg["dataset"])
        model, resume = init_model(cfg, data, rt)
        train(cfg, model, data, ce_loss(cfg, model.config.vocab_size), rt, resume,
              extra_state=dict(tokenizer=data.tokenizer))
    finally:
        rt.close()


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
