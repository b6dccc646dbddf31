"""HF weights in and out (GPT-2, Llama, Qwen2; hf.py): a HF folder or GPT-2 name becomes our
checkpoint, our checkpoint a HF folder.

    python convert.py to=ours source=gpt2-large out_dir=out/gpt2-large   # then init_from=out/gpt2-large
    python convert.py to=ours source=path/to/CodeLlama-7b-hf out_dir=out/codellama
    python convert.py to=hf source=out/student out=hf/student          # transformers can load it
"""
import math
import os

import checkpoint
from configurator import OUT_DIR, UserError, run
import hf
from model import GPTConfig
from tokenizer import TOKENIZER_FILE, tokenizer_from_meta

DEFAULTS = dict(
    to="",  # ours: a HF folder or GPT-2 name becomes our checkpoint; hf: our checkpoint a HF folder
    source="",  # what is converted: a HF folder or GPT-2 name (to=ours), our out_dir or .pt (to=hf)
    out_dir="",  # to=ours: the checkpoint folder written (fine-tune with init_from=out_dir)
    out="",  # to=hf: the HF folder written (config.json, model.safetensors)
    overwrite=False,  # replace what out_dir or out already holds
    shard_gb=5.0,  # to=hf: safetensors shards of at most this many GB (transformers' default), with an index
)
LIMITS = dict(to=("ours", "hf"), out_dir=OUT_DIR, out=OUT_DIR, shard_gb="(0, inf)")


def to_ours(cfg):
    out_dir = cfg["out_dir"]
    if not out_dir:
        raise UserError("to=ours writes a checkpoint folder: give out_dir=FOLDER")
    if checkpoint.is_checkpoint(out_dir) and not cfg["overwrite"]:
        raise UserError(f"{out_dir} already holds a checkpoint; choose another out_dir or pass "
                        f"overwrite=True")
    if checkpoint.is_checkpoint(cfg["source"]):
        raise UserError(f"{cfg['source']} is already our checkpoint; to=ours reads a HF folder or "
                        f"a GPT-2 name")
    # HF keeps the vocab as is (50257); padding the embedding to a multiple of 64 makes fine-tuning
    # matmuls faster, and the extra rows are zeros whose logits nothing ever reads
    model, tokenizer, _ = checkpoint.load_model(cfg["source"], pad_vocab_to=GPTConfig.pad_vocab_to)
    config = model.config
    if cfg["overwrite"]:
        checkpoint.clear(out_dir)
    state = dict(model=model.state_dict(), model_args=config.to_dict(), config=cfg, step=0,
                 best_val_loss=math.inf, tokenizer=tokenizer)
    path = checkpoint.save(state, out_dir, step=0, keep_last=1)
    print(f"wrote {path} ({model.num_params() / 1e6:.2f}M parameters, {config.n_layer} layers, "
          f"context {config.block_size}); fine-tune with init_from={out_dir}")


def to_hf(cfg):
    out = cfg["out"]
    if not out:
        raise UserError("to=hf writes a HF folder: give out=FOLDER")
    if os.path.exists(os.path.join(out, "config.json")) and not cfg["overwrite"]:
        raise UserError(f"{out} already holds a HF model; choose another out or pass overwrite=True")
    if not checkpoint.is_checkpoint(cfg["source"]):
        raise UserError(f"checkpoint not found: {cfg['source']} (to=hf reads our out_dir or a .pt file)")
    model, tokenizer, _ = checkpoint.load_model(cfg["source"])
    # a tokenizer.json's end-of-text id (Llama's </s>, our BPE's <|endoftext|>) is where
    # transformers' generate stops
    eos = tokenizer_from_meta(tokenizer).eot if "tokenizer_json" in tokenizer else None
    files = hf.export(model, out, shard_bytes=int(cfg["shard_gb"] * 1e9), eos_token_id=eos)
    print(f"wrote {out}/config.json and {len(files)} safetensors file(s); load with "
          f"transformers.AutoModelForCausalLM.from_pretrained({out!r})")
    if tokenizer.get("tokenizer") == "gpt2":
        print("tokenizer: GPT-2's own (transformers.AutoTokenizer.from_pretrained('gpt2'))")
    elif "tokenizer_json" in tokenizer:
        with open(os.path.join(out, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            f.write(tokenizer["tokenizer_json"])
        print(f"wrote {out}/{TOKENIZER_FILE}: the model's own tokenizer "
              f"(transformers.PreTrainedTokenizerFast(tokenizer_file=...))")
    else:
        print(f"note: this model uses the {tokenizer.get('tokenizer')} tokenizer, which HF has no "
              f"equivalent of; only the weights and config.json are exported")


def main(cfg):
    if not cfg["source"]:
        raise UserError("give source=: a HF folder or GPT-2 name (to=ours), our checkpoint (to=hf)")
    (to_ours if cfg["to"] == "ours" else to_hf)(cfg)


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
