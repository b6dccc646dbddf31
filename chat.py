"""Chat templates: the jinja2 template a HF model folder ships (tokenizer_config.json's
"chat_template", or chat_template.jinja beside it) or a file given, rendered into the prompt text
of /v1/chat/completions, and the tokens that end an assistant's turn.

Rendering follows transformers' apply_chat_template: a sandboxed environment with trim_blocks and
lstrip_blocks, the folder's special tokens (bos_token, eos_token, ...) as variables,
add_generation_prompt=True, and raise_exception() for templates that refuse a conversation.
"""
import json
import os
from datetime import datetime

from configurator import UserError
from inputs import read_text_file

CONFIG_FILE, TEMPLATE_FILE = "tokenizer_config.json", "chat_template.jinja"
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")


class TemplateRefused(Exception):
    """A template's raise_exception(): the conversation is not one it can render."""


def _read_json(path):
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError:
        raise UserError(f"{path} is not valid JSON") from None


def _content(token):
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


class ChatTemplate:
    def __init__(self, source, special, where):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateRefused(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise UserError(f"{where}: not a jinja2 template ({e})") from None
        self.special = special
        self.where = where

    def render(self, messages):
        """The prompt text of a conversation [{"role", "content"}], ending where the assistant's
        answer begins. Raises TemplateRefused, or jinja2.TemplateError for a broken template."""
        return self.template.render(messages=messages, add_generation_prompt=True, **self.special)


def load(source, template_file=""):
    """The chat template of a model: template_file when given, else the HF folder's own; None
    when there is none."""
    config = _read_json(os.path.join(source, CONFIG_FILE)) if os.path.isdir(source) else {}
    special = {k: _content(config[k]) for k in SPECIAL if _content(config.get(k)) is not None}
    if template_file:
        return ChatTemplate(read_text_file(template_file, "chat_template="), special, template_file)
    text = config.get("chat_template")
    if isinstance(text, list):  # several named templates: the default one
        text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
    where = os.path.join(source, CONFIG_FILE)
    jinja = os.path.join(source, TEMPLATE_FILE) if os.path.isdir(source) else ""
    if not text and os.path.isfile(jinja):
        text, where = read_text_file(jinja, ""), jinja
    return ChatTemplate(text, special, where) if isinstance(text, str) and text else None


def end_of_turn_ids(source, tok):
    """Ids that end an assistant's turn: the tokenizer's end-of-text, the folder's eos_token, and
    config.json's / generation_config.json's eos_token_id (an id or a list of them)."""
    ids = set() if tok.eot is None else {tok.eot}
    if not os.path.isdir(source):
        return ids
    eos = _content(_read_json(os.path.join(source, CONFIG_FILE)).get("eos_token"))
    if isinstance(eos, str) and len(tok.encode_special(eos)) == 1:
        ids |= set(tok.encode_special(eos))
    for name in ("config.json", "generation_config.json"):
        given = _read_json(os.path.join(source, name)).get("eos_token_id")
        for i in given if isinstance(given, list) else [given]:
            if isinstance(i, int) and 0 <= i < tok.vocab_size:
                ids.add(i)
    return ids
