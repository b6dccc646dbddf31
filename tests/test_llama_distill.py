"""The Llama recipe end to end on CPU: a tokenizer trained by prepare/tokenizer.py, data prepared
with it, a tiny random HF Llama teacher on disk holding the same tokenizer.json, distilled into
smaller Llama students in every mode (the shipped CodeLlama config with tiny sizes, depth pruning
with student_init=teacher_layers), a Llama trained from scratch, and the student exported to HF."""
import json
import os
import shutil

import pytest
import torch

import checkpoint
import hf
from conftest import read_metrics, run_script
from prepare.plays import markdown_to_text, play_files

transformers = pytest.importorskip("transformers")

VOCAB = 300
TEACHER = dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=100,
               num_hidden_layers=4, max_position_embeddings=128, rope_theta=1e6, rms_norm_eps=1e-5,
               tie_word_embeddings=False)
SMALL = ["n_layer=2", "block_size=32", "batch_size=2", "gradient_accumulation_steps=1", "eval_iters=1",
         "eval_interval=100", "log_interval=1", "warmup_iters=1", "compile=False", "device=cpu",
         "final_eval=False", "max_iters=3"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    with open(play_files()["twelfth-night"], encoding="utf-8") as f:
        text = markdown_to_text(f.read())
    os.makedirs(root / "docs")
    for i in range(6):
        (root / "docs" / f"{i}.txt").write_text(text[i * 3000:(i + 1) * 3000], encoding="utf-8")
    run_script("prepare/tokenizer.py", f"input={root / 'docs'}", f"vocab_size={VOCAB}", f"out={root / 'tok'}")
    run_script("prepare/text.py", f"input={root / 'docs'}", f"tokenizer={root / 'tok'}", f"out={root / 'data'}")
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB, **TEACHER))
    teacher.to(torch.bfloat16).save_pretrained(root / "teacher", max_shard_size="100KB")
    shutil.copy(root / "tok" / "tokenizer.json", root / "teacher" / "tokenizer.json")
    return dict(root=root, data=str(root / "data"), teacher=str(root / "teacher"))


def soft_losses(out_dir):
    return [r["soft"] for r in read_metrics(out_dir) if "soft" in r]


def test_codellama_config_distils_and_exports(recipe):
    """The shipped config, only its sizes shrunk (and no compile on CPU): logit KD from a bf16
    teacher into a narrower Llama, then convert.py to=hf and transformers reads the student."""
    out, exported = recipe["root"] / "cfg", recipe["root"] / "exported"
    run_script("distill.py", "config/distill_codellama_7b_to_100m.py", f"teacher={recipe['teacher']}",
               f"dataset={recipe['data']}", f"out_dir={out}", *SMALL, "n_head=4", "n_kv_head=2", "n_embd=32",
               "intermediate_size=64")
    soft = soft_losses(out)
    assert len(soft) == 3 and all(s > 0 for s in soft)
    student, tok, ckpt = checkpoint.load_model(str(out))
    assert ckpt["model_args"]["family"] == "llama" and ckpt["config"]["teacher_dtype"] == "bfloat16"
    assert (student.config.n_kv_head, student.config.tie_embeddings) == (2, True)
    run_script("convert.py", "to=hf", f"source={out}", f"out={exported}")
    assert (exported / "tokenizer.json").read_text() == (recipe["root"] / "tok" / "tokenizer.json").read_text()
    assert json.loads((exported / "config.json").read_text())["eos_token_id"] == 0  # <|endoftext|>
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    idx = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, student.eval()(idx)[0][..., :VOCAB], atol=1e-4, rtol=0)


def test_hybrid_from_teacher_layers(recipe):
    """Depth pruning: a 2-block student of the teacher's width starts as its blocks 0 and 3."""
    out = recipe["root"] / "pruned"
    p = run_script("distill.py", f"teacher={recipe['teacher']}", "teacher_dtype=bfloat16", f"dataset={recipe['data']}",
                   f"out_dir={out}", *SMALL, "family=llama", "n_head=6", "n_kv_head=2", "n_embd=48",
                   "intermediate_size=100", "rope_theta=1e6", "tie_embeddings=False", "bias=False",
                   "distill_type=hybrid", "student_init=teacher_layers", "max_iters=0")
    assert "teacher blocks [0, 3]" in p.stdout
    student = checkpoint.load_model(str(out))[0]
    teacher = hf.load(recipe["teacher"])  # bf16 on disk: the student holds the same values in fp32
    assert torch.equal(student.blocks[1].mlp.c_fc.weight, teacher.blocks[3].mlp.c_fc.weight)
    assert torch.equal(student.blocks[0].attn.c_attn.weight, teacher.blocks[0].attn.c_attn.weight)
    assert torch.equal(student.head_weight[:VOCAB], teacher.head_weight)


def test_output_mode_and_training_from_scratch(recipe):
    out = recipe["root"] / "output"
    run_script("distill.py", f"teacher={recipe['teacher']}", f"dataset={recipe['data']}", f"out_dir={out}",
               *SMALL, "family=llama", "n_head=4", "n_kv_head=1", "n_embd=32", "distill_type=output")
    records = [r for r in read_metrics(out) if "hard" in r]
    assert len(records) == 3 and not soft_losses(out)
    scratch = recipe["root"] / "scratch"
    run_script("train.py", f"dataset={recipe['data']}", f"out_dir={scratch}", *SMALL, "family=llama", "n_head=4",
               "n_kv_head=2", "n_embd=32", "rope_theta=500000.0", "norm_eps=1e-6", "tie_embeddings=False",
               "bias=False")
    args = checkpoint.load(str(scratch))["model_args"]
    assert (args["family"], args["n_kv_head"], args["intermediate_size"], args["rope_theta"], args["norm_eps"],
            args["tie_embeddings"]) == ("llama", 2, 256, 500000.0, 1e-6, False)
