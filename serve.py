"""Serve a model over OpenAI's HTTP API: completions (streamed or not, with top-k log-probs and
echo) and, for a model with a chat template, chat completions; concurrent requests batched.

    python serve.py source=out/student port=8000
    python serve.py source=path/to/hf_llama name=teacher max_logprobs=64 tokens_as_ids=True
    OPENAI_API_KEY=... python serve.py source=out/student api_key_env=OPENAI_API_KEY host=0.0.0.0

    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "student", "prompt": "ROMEO:", "max_tokens": 40, "temperature": 0.8}'

Any client of OpenAI's API works (openai.OpenAI(base_url="http://localhost:8000/v1", api_key=...)).
With seed= a request's text depends on its seed and settings only, not on what it was batched with.
"""
import os
import sys

import chat
import checkpoint
from configurator import UserError, run
from runtime import DTYPE_CHOICES, Runtime
from server import SETTINGS, SETTINGS_LIMITS, build, listen, url_of, uvicorn_server

DEFAULTS = dict(
    source="out/run",  # our out_dir or .pt, a HF folder (GPT-2, Llama, Qwen2), or a GPT-2 name
    name="",  # the model name clients ask for; default: the last part of source
    host="127.0.0.1",  # the address to listen on; 0.0.0.0 serves other machines too
    port=8000,  # the port; 0 picks a free one (printed)
    api_key_env="",  # name of an environment variable holding the key clients must send; empty: no key
    chat_template="",  # a jinja2 chat template file; default: the HF folder's own (chat needs one)
    **SETTINGS,
    device="auto",  # auto (cuda if available, else cpu), cpu, cuda, cuda:N, mps
    dtype="auto",  # autocast dtype; auto: bfloat16 or float16 on GPUs, float32 on CPU
    compile=False,  # torch.compile the model
)
LIMITS = dict(port="[0, 65535]", dtype=DTYPE_CHOICES, **SETTINGS_LIMITS)


def api_key(env):
    """The key clients must send, from the environment variable named `env`; None when none is set."""
    if not env:
        return None
    key = os.environ.get(env, "")
    if not key:
        raise UserError(f"api_key_env={env}: that environment variable is not set or empty; export the key "
                        f"clients must send, or leave api_key_env empty to serve without one")
    return key


def main(cfg):
    key = api_key(cfg["api_key_env"])
    source = cfg["source"]
    template = chat.load(source, cfg["chat_template"])  # a broken template should not wait for the weights
    rt = Runtime(cfg)
    model, tok = checkpoint.load_for_generation(source, rt.device, cfg["compile"])
    name = cfg["name"] or os.path.basename(os.path.normpath(source))
    app = build(model, tok, rt, name, cfg, template, chat.end_of_turn_ids(source, tok), key)
    sock = listen(cfg["host"], cfg["port"])
    print(f"serving {name} ({model.num_params() / 1e6:.2f}M parameters, context {model.config.block_size}, "
          f"{tok.name} tokenizer, {'a' if template else 'no'} chat template; {rt.device} {rt.dtype}) at "
          f"{url_of(sock)}{'; clients must send the key in $' + cfg['api_key_env'] if key else ''}",
          file=sys.stderr, flush=True)
    uvicorn_server(app).run(sockets=[sock])


if __name__ == "__main__":
    run(main, DEFAULTS, LIMITS)
