"""The family seam: Llama (and Qwen2) against transformers both ways, sharded and bf16 folders read
straight into place, checkpoints that predate families, bad HF folders as one-line errors, and no
family's modules named outside model.py and hf.py."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import checkpoint
import convert
import engine
import hf
from configurator import run
from conftest import ROOT
from model import GPT, GPTConfig, build

transformers = pytest.importorskip("transformers")

V = 300
# odd on purpose: 6 query heads share 2 k/v heads, an MLP width no multiple of 64, a rare rope base
LLAMA = dict(vocab_size=V, hidden_size=48, intermediate_size=100, num_hidden_layers=3, num_attention_heads=6,
             num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=96,
             rms_norm_eps=1e-5)


def random_hf(folder, cls="Llama", dtype=torch.float32, shard=None, **overrides):
    """A randomly initialised transformers model saved to `folder` (norm weights jittered, so a
    norm read into the wrong place shows)."""
    torch.manual_seed(0)
    config = getattr(transformers, cls + "Config")(**dict(LLAMA, **overrides))
    m = getattr(transformers, cls + "ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    m.to(dtype).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return m


def tokens(B=2, T=50, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(ours, theirs, idx):
    with torch.no_grad():
        return (ours.eval()(idx)[0][..., :V] - theirs.eval()(idx).logits).abs().max().item()


def test_llama_import_matches_transformers_logits_and_greedy(tmp_path):
    theirs = random_hf(tmp_path / "hf", shard="60KB")
    assert os.path.isfile(tmp_path / "hf" / hf.INDEX)  # read shard by shard
    ours = hf.load(str(tmp_path / "hf"))
    c = ours.config
    assert (c.family, c.n_kv_head, c.intermediate_size, c.rope_theta, c.tie_embeddings) == \
        ("llama", 2, 100, 500000.0, False)
    assert max_diff(ours, theirs, tokens()) < 1e-4
    prompt = tokens(B=1, T=7, seed=3)
    ref = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40,
                          min_new_tokens=40, do_sample=False, pad_token_id=0)
    assert engine.generate(ours, prompt.tolist(), 40, temperature=0)[0].tokens == ref[0, 7:].tolist()


@pytest.mark.parametrize("tie,bias", [(False, False), (True, True)])
def test_llama_export_matches_transformers_and_reads_back(tmp_path, tie, bias):
    torch.manual_seed(0)
    ours = build(dict(family="llama", n_layer=2, n_head=6, n_kv_head=2, n_embd=48, intermediate_size=100,
                      block_size=64, vocab_size=V, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=tie,
                      bias=bias)).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    files = hf.export(ours, tmp_path / "exp", shard_bytes=40_000)
    assert len(files) > 1 and os.path.isfile(tmp_path / "exp" / hf.INDEX)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp")
    assert type(theirs).__name__ == "LlamaForCausalLM"
    idx = tokens(T=40)
    assert max_diff(ours, theirs, idx) < 1e-4
    back = hf.load(str(tmp_path / "exp"))
    assert back.config == GPTConfig.from_dict(dict(ours.config.to_dict(), pad_vocab_to=1))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], ours(idx)[0][..., :V])


def test_qwen2_biases_on_qkv_only(tmp_path):
    theirs = random_hf(tmp_path / "hf", cls="Qwen2", tie_word_embeddings=True)
    ours = hf.load(str(tmp_path / "hf"))
    assert ours.config.qkv_bias and not ours.config.bias and ours.config.tie_embeddings
    assert max_diff(ours, theirs, tokens()) < 1e-4
    hf.export(ours, tmp_path / "exp")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp")
    assert type(again).__name__ == "Qwen2ForCausalLM" and max_diff(ours, again, tokens()) < 1e-4


def test_bf16_shards_read_into_place(tmp_path):
    theirs = random_hf(tmp_path / "hf", dtype=torch.bfloat16, shard="40KB")
    sd = theirs.state_dict()
    for dtype in (torch.bfloat16, torch.float32):
        ours = hf.load(str(tmp_path / "hf"), dtype=dtype)
        assert {p.dtype for p in ours.parameters()} == {dtype}
        layer = "model.layers.1.self_attn."
        qkv = torch.cat([sd[layer + p + "_proj.weight"] for p in "qkv"]).to(dtype)
        assert torch.equal(ours.blocks[1].attn.c_attn.weight, qkv)
        assert torch.equal(ours.head_weight, sd["lm_head.weight"].to(dtype))


def test_checkpoint_from_before_families_loads_as_gpt2(tmp_path):
    torch.manual_seed(0)
    old = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=40)).eval()
    # the model_args every checkpoint held before the family was recorded
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=40, pad_vocab_to=64, bias=True,
                dropout=0.0)
    checkpoint.save(dict(model=old.state_dict(), model_args=args, config={}, step=0, best_val_loss=1.0,
                         tokenizer=dict(tokenizer="char", vocab_size=40, chars="".join(map(chr, range(40, 80))))),
                    str(tmp_path / "old"), step=0)
    model, _, _ = checkpoint.load_model(str(tmp_path / "old"))
    assert model.config.family == "gpt2" and model.config.n_kv_head == 2 and model.config.intermediate_size == 128
    idx = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx)[0], old(idx)[0])


def test_new_checkpoints_record_the_family(tmp_path):
    torch.manual_seed(0)
    m = build(dict(family="llama", n_layer=1, n_head=4, n_kv_head=1, n_embd=32, block_size=16, vocab_size=40,
                   bias=False, tie_embeddings=False))
    assert m.config.to_dict()["family"] == "llama"
    state = dict(model=m.state_dict(), model_args=m.config.to_dict(), config={}, step=0, best_val_loss=1.0,
                 tokenizer=dict(tokenizer="char", vocab_size=40, chars="".join(map(chr, range(40, 80)))))
    checkpoint.save(state, str(tmp_path / "ll"), step=0)
    back, _, _ = checkpoint.load_model(str(tmp_path / "ll"), dtype=torch.bfloat16)
    assert back.config == m.config and back.head_weight.dtype == torch.bfloat16
    assert torch.equal(back.blocks[0].mlp.c_fc.weight, m.blocks[0].mlp.c_fc.weight.to(torch.bfloat16))


def test_lora_freezing_and_depths_of_an_untied_llama():
    import lora
    import optim
    torch.manual_seed(0)
    m = build(dict(family="llama", n_layer=3, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=40,
                   bias=False, tie_embeddings=False)).eval()
    depths = {name: m.depth_of(name) for name, _ in m.named_parameters()}
    assert depths["transformer.wte.weight"] == 0 and depths["transformer.h.2.mlp.c_fc.weight"] == 3
    assert depths["lm_head.weight"] == depths["transformer.ln_f.weight"] == 4
    optim.freeze(m, 2)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == \
        [n for n in depths if n.startswith("transformer.h.2.") or depths[n] == 4]
    idx = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        before = m(idx)[0]
        lora.apply(m, rank=4, alpha=8, targets="attn,mlp,mlp_proj")
        for p in m.parameters():
            if p.requires_grad:  # the adapters: B starts at 0, so move it to make the merge matter
                p.add_(0.05)
        adapted = m(idx)[0]
        assert not torch.allclose(adapted, before)
        torch.testing.assert_close(lora.merge(m)(idx)[0], adapted, atol=1e-5, rtol=0)


def test_seam_no_family_modules_outside_model_and_hf():
    """Everything else asks the model (blocks, depth_of, lora_targets, head_weight, init_from_layers)."""
    module_names = re.compile(r"\.transformer\b|\bwte\b|\bwpe\b|\bc_attn\b|\bc_fc\b|\bc_proj\b|\bln_f\b|\blm_head\b")
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "prepare", "*.py"))
    offenders = []
    for path in files:
        if os.path.basename(path) in ("model.py", "hf.py"):
            continue
        with open(path, encoding="utf-8") as f:
            offenders += [f"{os.path.basename(path)}:{n}" for n, line in enumerate(f, 1) if module_names.search(line)]
    assert len(files) > 10 and not offenders, offenders


# ---------------------------------------------------------------- bad HF folders


def convert_error(capsys, source, out_dir):
    with pytest.raises(SystemExit) as e:
        run(convert.main, convert.DEFAULTS, convert.LIMITS, ["to=ours", f"source={source}", f"out_dir={out_dir}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(out_dir)
    return err


def tokenizer_json(folder, vocab):
    """A word-level tokenizer.json of `vocab` tokens."""
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0")).save(str(folder / "tokenizer.json"))


def edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


def test_bad_hf_folders_are_one_line_errors(tmp_path, capsys):
    folder = tmp_path / "hf"
    random_hf(folder, shard="60KB", num_hidden_layers=2)
    tokenizer_json(folder, V)
    out = tmp_path / "out"
    capsys.readouterr()  # transformers' progress bar

    edit_config(folder, intermediate_size=128)
    assert "model.layers.0.mlp.gate_proj.weight has shape (100, 48), config.json implies (128, 48)" in \
        convert_error(capsys, folder, out)
    edit_config(folder, intermediate_size=100, num_hidden_layers=3)
    assert "weight model.layers.2.input_layernorm.weight missing" in convert_error(capsys, folder, out)
    edit_config(folder, num_hidden_layers=2)

    tokenizer_json(folder, V - 1)
    assert f"does not fit its model's vocab of {V}" in convert_error(capsys, folder, out)
    tokenizer_json(folder, V)

    index = json.loads((folder / hf.INDEX).read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.rename(folder / shard, tmp_path / shard)
    assert f"shard {shard}, named by {hf.INDEX}, is missing" in convert_error(capsys, folder, out)
    os.rename(tmp_path / shard, folder / shard)

    edit_config(folder, model_type="mistral")
    assert "model_type 'mistral' is not supported (supported: gpt2, llama, qwen2)" in \
        convert_error(capsys, folder, out)
    edit_config(folder, model_type="llama", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    assert "rope scaling 'llama3'" in convert_error(capsys, folder, out)

    edit_config(folder, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    run(convert.main, convert.DEFAULTS, convert.LIMITS, ["to=ours", f"source={folder}", f"out_dir={out}"])
    assert checkpoint.load(str(out))["model_args"]["family"] == "llama"


# ---------------------------------------------------------------- memory


MEASURE = """
import re, sys, torch, hf, model
def rss(key):
    return int(re.search(rf"^{key}:\\s+(\\d+) kB", open("/proc/self/status").read(), re.M).group(1)) * 1024
# torch loads its meta-device machinery (~75 MB of modules) on the first meta tensor, whatever the size
model.build(dict(family="llama", n_layer=1, n_head=2, n_embd=8, vocab_size=8, block_size=8), device="meta")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak mark starts here, above the interpreter and torch
base = rss("VmRSS")
model = hf.load(sys.argv[1], dtype=torch.bfloat16)
print(rss("VmHWM") - base, sum(p.numel() * p.element_size() for p in model.parameters()))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_loading_bf16_shards_costs_about_the_weights(tmp_path):
    """Peak RSS of a fresh process loading a 65 MB bf16 model in 7 shards, above its resident
    interpreter and torch: the weights once, not twice."""
    torch.manual_seed(0)
    m = build(dict(family="llama", n_layer=8, n_head=8, n_kv_head=2, n_embd=512, intermediate_size=1536,
                   block_size=256, vocab_size=8000, bias=False, tie_embeddings=False), dtype=torch.bfloat16)
    hf.export(m, tmp_path / "m", shard_bytes=10_000_000)
    p = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "m")], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-2000:]
    peak, weights = map(int, p.stdout.split())
    assert weights > 60e6 and peak < 1.2 * weights, (peak, weights)
