"""HF model folders in and out: config.json plus safetensors, one file or shards with
model.safetensors.index.json (GPT-2 folders may hold pytorch_model.bin instead).

One section per family: how its config.json maps onto ours, and its weight map - the HF tensors
each of our parameters is made of (fused ones are HF's tensors stacked by rows) - read in one
direction by `load`, written in the other by `export`.

`load` never holds a weight twice: the model is built on the meta device, given empty tensors
in the target dtype, and each tensor is read from its shard straight into its place (a shard is
never mapped or read whole), so a bf16 teacher costs its weights' bytes.
"""
import json
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from safetensors.torch import save_file

from configurator import UserError
from model import GPT2_SIZES, build

INDEX = "model.safetensors.index.json"
SHARD_BYTES = 5 * 2**30  # save_pretrained's default max_shard_size ("5GB")
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


# ---------------------------------------------------------------- GPT-2


def gpt2_config(hf):
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function {hf['activation_function']!r} (GPT-2 uses gelu_new)")
    return dict(family="gpt2", n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                intermediate_size=hf.get("n_inner") or 0, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                bias=True, tie_embeddings=True)


def gpt2_hf_config(c):
    if c.n_kv_head != c.n_head or not c.tie_embeddings:
        raise UserError("HF GPT-2 has neither grouped-query attention nor an untied head: this model "
                        "cannot be exported as GPT-2")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd,
            "n_positions": c.block_size, "n_ctx": c.block_size, "n_inner": c.intermediate_size,
            "vocab_size": c.vocab_size, "activation_function": "gelu_new",
            "layer_norm_epsilon": c.norm_eps, "initializer_range": 0.02,
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
            "bos_token_id": c.vocab_size - 1, "eos_token_id": c.vocab_size - 1,
            "tie_word_embeddings": True}


def gpt2_linears(c):
    """HF's Conv1D stores (in, out), transposed from nn.Linear's (out, in)."""
    C, I = c.n_embd, c.intermediate_size
    return (("attn.c_attn", C, 3 * C), ("attn.c_proj", C, C), ("mlp.c_fc", C, I), ("mlp.c_proj", I, C))


def gpt2_weights(c):
    """(ours, [(theirs, HF shape)], transposed): the names are the same on both sides."""
    C = c.n_embd
    same = lambda name, shape, t=False: (name, [(name, shape)], t)  # noqa: E731
    yield same("transformer.wte.weight", (c.vocab_size, C))
    yield same("transformer.wpe.weight", (c.block_size, C))
    norms = [f"ln_{i}" for i in (1, 2)]
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        for n in norms:
            yield same(p + n + ".weight", (C,))
            if c.bias:
                yield same(p + n + ".bias", (C,))
        for name, n_in, n_out in gpt2_linears(c):
            yield same(p + name + ".weight", (n_in, n_out), True)
            if c.bias:
                yield same(p + name + ".bias", (n_out,))
    yield same("transformer.ln_f.weight", (C,))
    if c.bias:
        yield same("transformer.ln_f.bias", (C,))


def gpt2_zero_biases(c):
    """HF GPT-2 always has biases: a model without them is the same function with zeros."""
    if c.bias:
        return
    C = c.n_embd
    for i in range(c.n_layer):
        p = f"transformer.h.{i}."
        yield from ((p + n + ".bias", (C,)) for n in ("ln_1", "ln_2"))
        yield from ((p + name + ".bias", (n_out,)) for name, _, n_out in gpt2_linears(c))
    yield "transformer.ln_f.bias", (C,)


# ---------------------------------------------------------------- Llama (and Qwen2: q/k/v biases)


def llama_config(hf):
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} (only plain RoPE is modelled)")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim", width // heads) != width // heads or hf.get("hidden_act", "silu") != "silu":
        raise ValueError("head_dim other than hidden_size / heads, or an MLP activation other than silu")
    qwen = hf["model_type"] == "qwen2"
    if qwen and hf.get("use_sliding_window"):
        raise ValueError("sliding-window attention")
    bias = hf.get("attention_bias", False)
    if hf.get("mlp_bias", bias) != bias:
        raise ValueError("attention_bias and mlp_bias differ")
    return dict(family="llama", n_layer=hf["num_hidden_layers"], n_head=heads, n_embd=width,
                n_kv_head=hf.get("num_key_value_heads") or heads, block_size=hf["max_position_embeddings"],
                vocab_size=hf["vocab_size"], intermediate_size=hf["intermediate_size"],
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
                bias=bias, qkv_bias=qwen)


def llama_hf_config(c):
    qwen = c.qkv_bias and not c.bias
    name, arch = ("qwen2", "Qwen2ForCausalLM") if qwen else ("llama", "LlamaForCausalLM")
    out = {"architectures": [arch], "model_type": name, "hidden_size": c.n_embd,
           "intermediate_size": c.intermediate_size, "num_hidden_layers": c.n_layer,
           "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
           "head_dim": c.head_dim, "max_position_embeddings": c.block_size, "vocab_size": c.vocab_size,
           "rms_norm_eps": c.norm_eps, "hidden_act": "silu", "tie_word_embeddings": c.tie_embeddings,
           # transformers 5 reads rope_parameters, earlier versions rope_theta
           "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
           "initializer_range": 0.02, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if not qwen:
        out.update(attention_bias=c.bias, mlp_bias=c.bias)
    return out


def llama_weights(c):
    C, kv, I = c.n_embd, c.n_kv_head * c.head_dim, c.intermediate_size
    yield "transformer.wte.weight", [("model.embed_tokens.weight", (c.vocab_size, C))], False
    for i in range(c.n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        qkv = [(theirs + f"self_attn.{p}_proj", rows) for p, rows in (("q", C), ("k", kv), ("v", kv))]
        linears = [("attn.c_attn", qkv, C, c.bias or c.qkv_bias),
                   ("attn.c_proj", [(theirs + "self_attn.o_proj", C)], C, c.bias),
                   ("mlp.c_fc", [(theirs + f"mlp.{p}_proj", I) for p in ("gate", "up")], C, c.bias),
                   ("mlp.c_proj", [(theirs + "mlp.down_proj", C)], I, c.bias)]
        yield ours + "ln_1.weight", [(theirs + "input_layernorm.weight", (C,))], False
        yield ours + "ln_2.weight", [(theirs + "post_attention_layernorm.weight", (C,))], False
        for name, pieces, n_in, bias in linears:
            yield ours + name + ".weight", [(p + ".weight", (rows, n_in)) for p, rows in pieces], False
            if bias:
                yield ours + name + ".bias", [(p + ".bias", (rows,)) for p, rows in pieces], False
    yield "transformer.ln_f.weight", [("model.norm.weight", (C,))], False
    if not c.tie_embeddings:
        yield "lm_head.weight", [("lm_head.weight", (c.vocab_size, C))], False


# ---------------------------------------------------------------- the families


@dataclass(frozen=True)
class HFFamily:
    model_types: tuple  # config.json's model_type values it reads
    config: Callable  # HF config dict -> our config fields (ValueError: not a model we can run)
    hf_config: Callable  # our config -> HF config dict
    weights: Callable  # our config -> (ours, [(theirs, HF shape)], transposed) for every parameter
    extras: Callable = lambda c: ()  # our config -> (theirs, shape) HF wants, written as zeros
    tokenizer: dict = None  # the tokenizer of a folder without tokenizer.json, if the family has one


FAMILIES = {
    "gpt2": HFFamily(("gpt2",), gpt2_config, gpt2_hf_config, gpt2_weights, gpt2_zero_biases,
                     tokenizer=dict(tokenizer="gpt2")),
    "llama": HFFamily(("llama", "qwen2"), llama_config, llama_hf_config, llama_weights),
}


def family_of(model_type, folder):
    for name, fam in FAMILIES.items():
        if model_type in fam.model_types:
            return fam
    known = ", ".join(t for fam in FAMILIES.values() for t in fam.model_types)
    raise UserError(f"{folder}: model_type {model_type!r} is not supported (supported: {known})")


# ---------------------------------------------------------------- reading weights


class Safetensors:
    """The tensors of model.safetensors or of the shards an index names: where each one's bytes
    lie, read on demand into a tensor the caller owns."""

    def __init__(self, folder):
        index = os.path.join(folder, INDEX)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{index} is not a safetensors index ({type(e).__name__}); "
                                f"re-download or re-export the model") from None
        else:
            files = ["model.safetensors"]
        self.entries, self.handles = {}, {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise UserError(f"{folder}: shard {name}, named by {INDEX}, is missing; re-download it")
            self.entries.update({k: (path, *v) for k, v in self._header(path).items()})

    @staticmethod
    def _header(path):
        """{tensor name: (dtype, shape, first byte, end byte)}, checked against the file's size."""
        size = os.path.getsize(path)
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 2 <= n <= size - 8:
                    raise ValueError(f"header of {n} bytes in a file of {size}")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            out = {}
            for name, e in header.items():
                start, end = (8 + n + o for o in e["data_offsets"])
                dtype = DTYPES.get(e["dtype"])
                if dtype is None:
                    raise ValueError(f"{name} has dtype {e['dtype']}")
                if end > size or end - start != np.prod(e["shape"], dtype=np.int64) * dtype.itemsize:
                    raise ValueError(f"{name}'s bytes lie beyond the end of the file or do not fit its shape")
                out[name] = (dtype, tuple(e["shape"]), start, end)
            return out
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{path} is truncated or corrupt ({str(e)[:160]}); re-download or "
                            f"re-export it") from None

    def names(self):
        return self.entries.keys()

    def shape(self, name):
        return self.entries[name][2]

    def read_into(self, name, out):
        """Copy tensor `name` into `out` (contiguous, its shape), converting the dtype if needed."""
        path, dtype, shape, start, end = self.entries[name]
        dest = out if out.dtype == dtype else torch.empty(shape, dtype=dtype)
        if path not in self.handles:
            self.handles[path] = open(path, "rb")
        f = self.handles[path]
        f.seek(start)
        if end > start and f.readinto(dest.view(-1).view(torch.uint8).numpy()) != end - start:
            raise UserError(f"{path} ends inside tensor {name}: the file is truncated; re-download it")
        if dest is not out:
            out.copy_(dest)

    def close(self):
        for f in self.handles.values():
            f.close()


class StateDict:
    """pytorch_model.bin, the older format: mapped, not read, and never unpickled into code."""

    def __init__(self, path):
        try:
            self.sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise UserError(f"{path}: refused to load ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None

    def names(self):
        return self.sd.keys()

    def shape(self, name):
        return tuple(self.sd[name].shape)

    def read_into(self, name, out):
        out.copy_(self.sd[name])

    def close(self):
        self.sd = None


def open_weights(folder):
    if os.path.isfile(os.path.join(folder, INDEX)) or os.path.isfile(os.path.join(folder, "model.safetensors")):
        return Safetensors(folder)
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return StateDict(os.path.join(folder, "pytorch_model.bin"))
    raise UserError(f"{folder} holds no weights: expected model.safetensors, {INDEX} with its shards, "
                    f"or pytorch_model.bin")


def read_config(folder):
    """(HF family, our config fields) from folder/config.json."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
        fam = family_of(hf.get("model_type", "gpt2"), folder)
        return fam, fam.config(hf)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} describes no model we can run ({type(e).__name__}: {e}); "
                        f"re-download or re-export it") from None


def _download(name):
    if name not in GPT2_SIZES and name != "distilgpt2":
        raise UserError(f"'{name}' is neither a folder nor a GPT-2 name ({', '.join(GPT2_SIZES)}, distilgpt2)")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name if name != "gpt2" else "openai-community/gpt2",
                                 allow_patterns=["config.json", "*.safetensors"])
    except Exception as e:
        raise UserError(f"cannot download '{name}' ({type(e).__name__}); with no network pass a local "
                        f"HF folder holding config.json and model.safetensors instead") from None


def _find(src, name, folder):
    """A tensor's name in the file: a bare GPT2Model or LlamaModel saves its names without the
    transformer. / model. prefix."""
    for candidate in (name, name.split(".", 1)[-1]):
        if candidate in src.names():
            return candidate
    raise UserError(f"{folder}: weight {name} missing from the checkpoint; config.json and the "
                    f"weights disagree")


def load(name_or_dir, dtype=None, dropout=0.0, pad_vocab_to=1):
    """The model of a HF folder (or a GPT-2 hub name, with a network), its parameters in `dtype`
    (default float32). pad_vocab_to > 1 pads the embedding with zero rows, never read."""
    folder = name_or_dir if os.path.isdir(name_or_dir) else _download(name_or_dir)
    fam, args = read_config(folder)
    model = build(dict(args, dropout=dropout, pad_vocab_to=pad_vocab_to), dtype=dtype, device="meta")
    model.to_empty(device="cpu")
    model.tie()
    params = {name: p.detach() for name, p in model.named_parameters()}
    src = open_weights(folder)
    try:
        for ours, pieces, transposed in fam.weights(model.config):
            param, row = params.pop(ours), 0
            for theirs, shape in pieces:
                name = _find(src, theirs, folder)
                if src.shape(name) != shape:
                    raise UserError(f"{folder}: {theirs} has shape {src.shape(name)}, config.json "
                                    f"implies {shape}")
                rows = shape[-1] if transposed else shape[0]
                if transposed:
                    tmp = torch.empty(shape, dtype=param.dtype)
                    src.read_into(name, tmp)
                    param[row:row + rows].copy_(tmp.t())
                else:
                    src.read_into(name, param[row:row + rows])
                row += rows
            param[row:].zero_()  # the vocab padding rows
    finally:
        src.close()
    assert not params, f"no HF weight feeds {sorted(params)}"
    return model


# ---------------------------------------------------------------- writing


def _nbytes(t):
    return t.numel() * t.element_size()


def export(model, folder, shard_bytes=SHARD_BYTES, eos_token_id=None):
    """Write `folder` so that transformers' AutoModelForCausalLM.from_pretrained(folder) loads it:
    config.json and the weights in the model's dtype, in shards of at most shard_bytes (with
    model.safetensors.index.json) when they do not fit one. eos_token_id: the tokenizer's
    end-of-text id, when it has one."""
    c = model.config
    fam = FAMILIES[c.family]
    hf_config = dict(fam.hf_config(c), torch_dtype=str(model.head_weight.dtype).removeprefix("torch."))
    if eos_token_id is not None:
        hf_config["eos_token_id"] = eos_token_id
    params = dict(model.named_parameters())
    tensors = []
    for ours, pieces, transposed in fam.weights(c):
        w, row = params[ours].detach().cpu(), 0
        for theirs, shape in pieces:
            rows = shape[-1] if transposed else shape[0]
            piece = w[row:row + rows]
            # a slice of a fused tensor shares its memory, which safetensors refuses: copy it
            tensors.append((theirs, piece.t().contiguous() if transposed else
                            piece.clone() if len(pieces) > 1 else piece.contiguous()))
            row += rows
    tensors += [(name, torch.zeros(shape, dtype=model.head_weight.dtype)) for name, shape in fam.extras(c)]
    shards, size = [[]], 0
    for name, t in tensors:
        if shards[-1] and size + _nbytes(t) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += _nbytes(t)
    os.makedirs(folder, exist_ok=True)
    for old in os.listdir(folder):  # transformers would read a stale model.safetensors before an index
        if old == INDEX or old.startswith("model") and old.endswith(".safetensors"):
            os.remove(os.path.join(folder, old))
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(files, shards):
        save_file(dict(shard), os.path.join(folder, file), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(t) for _, t in tensors)},
                 "weight_map": {name: file for file, shard in zip(files, shards) for name, _ in shard}}
        with open(os.path.join(folder, INDEX), "w") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    return files
