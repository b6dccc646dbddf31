"""The OpenAI API as serve.py speaks it: completion and chat requests read and checked field by
field, and the JSON of responses and streamed chunks.

A bad field is an ApiError naming it, in OpenAI's error shape {"error": {"message", "type",
"param", "code"}}. JSON null reads as "not given", as OpenAI reads it. Sampling settings the
server cannot honour (penalties, logit_bias, best_of, suffix) are refused rather than ignored.

Log-probabilities name their tokens by text, or as "token_id:<id>" when asked (vLLM's
return_tokens_as_token_ids): byte-level BPE pieces that split a character all decode to U+FFFD, so
only ids are unique. text_offset counts the characters of each token decoded alone.
"""
import secrets
from dataclasses import dataclass

from configurator import UserError
from tokenizer import prompt_ids

SEEDS = 2 ** 63  # row r of a request with seed s samples with torch seed (s + r) mod 2^63
MAX_STOP = 16
# fields of OpenAI's API whose effect the engine does not have: refused unless they ask for nothing
UNSUPPORTED = dict(presence_penalty=(0,), frequency_penalty=(0,), logit_bias=({},), suffix=("",),
                   tools=([],), response_format=({"type": "text"},))


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param, message, code=None):
    return ApiError(400, f"{param}: {message}", param, code)


@dataclass
class Served:
    """The model behind the server and what a request may ask of it."""
    name: str
    tok: object
    block_size: int
    vocab_size: int
    stop_ids: frozenset  # ids that end a completion (end-of-text)
    chat: object  # chat.ChatTemplate or None
    chat_stop_ids: frozenset  # ids that end an assistant's turn
    max_tokens: int
    max_rows: int
    max_logprobs: int
    tokens_as_ids: bool


@dataclass
class Prompt:
    ids: list
    text: str


@dataclass
class Request:
    chat: bool
    prompts: list  # of Prompt
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: list  # strings that end a row, left out of its text
    stop_ids: frozenset
    seed: int
    logprobs: object  # None: not asked; k >= 0: every token's log-prob and its k most likely
    echo: bool
    stream: bool
    include_usage: bool
    tokens_as_ids: bool

    @property
    def sampling(self):
        """What the rows generated together must share."""
        return self.temperature, self.top_k, self.top_p, self.max_tokens

    def rows(self):
        """(prompt, torch seed) of every row, prompt-major: row p*n + j is sample j of prompt p."""
        return [(p, (self.seed + r) % SEEDS) for r, p in enumerate(p for p in self.prompts for _ in range(self.n))]


# ---------------------------------------------------------------- fields


def _kind(value):
    names = {bool: "a boolean", str: "a string", list: "an array", dict: "an object", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _given(body, key, default):
    value = body.get(key)
    return default if value is None else value


def _integer(body, key, default, lo, hi):
    value = _given(body, key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(key, f"must be an integer, not {_kind(value)}")
    if not lo <= value <= hi:
        raise bad(key, f"must be between {lo} and {hi}, got {value}")
    return value


def _number(body, key, default, lo, hi):
    value = _given(body, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(key, f"must be a number, not {_kind(value)}")
    if not lo <= value <= hi:
        raise bad(key, f"must be between {lo:g} and {hi:g}, got {value}")
    return float(value)


def _boolean(body, key, default):
    value = _given(body, key, default)
    if not isinstance(value, bool):
        raise bad(key, f"must be true or false, not {_kind(value)}")
    return value


def _stop(body):
    stop = _given(body, "stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", "must be a non-empty string or a list of them")
    if len(stop) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} strings, got {len(stop)}")
    return stop


def _model(body, served):
    model = body.get("model")
    if model is None:
        raise bad("model", f"is required (this server serves {served.name!r})", "missing")
    if not isinstance(model, str):
        raise bad("model", f"must be a string, not {_kind(model)}")
    if model != served.name:
        raise ApiError(404, f"model: {model!r} does not exist; this server serves {served.name!r}", "model",
                       "model_not_found")


def _refuse_unsupported(body, n):
    for key, nothing in UNSUPPORTED.items():
        if body.get(key) is not None and body[key] not in nothing:
            raise bad(key, "is not supported by this server; leave it out")
    if body.get("best_of") not in (None, n):
        raise bad("best_of", "is not supported by this server (it must equal n); leave it out")


def _seed(body):
    if body.get("seed") is None:
        return secrets.randbits(63)
    return _integer(body, "seed", 0, -2 ** 63, 2 ** 64 - 1)


def _stream(body):
    stream = _boolean(body, "stream", False)
    options = _given(body, "stream_options", {})
    if not isinstance(options, dict):
        raise bad("stream_options", f"must be an object, not {_kind(options)}")
    if options and not stream:
        raise bad("stream_options", "is only allowed with stream=true")
    return stream, _boolean(options, "include_usage", False)


# ---------------------------------------------------------------- prompts


def _is_id(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _prompt_items(body):
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "is required: a string, a list of token ids, or a list of either", "missing")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(x) for x in prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(
            isinstance(x, str) or (isinstance(x, list) and all(_is_id(y) for y in x)) for x in prompt):
        return prompt
    raise bad("prompt", "must be a string, a list of token ids, or a non-empty list of either")


def _prompt(item, served, limit, where):
    if isinstance(item, str):
        try:
            ids = prompt_ids(served.tok, item)
        except UserError as e:
            raise bad("prompt", f"{where}{e}") from None
        text = item
    else:
        outside = next((t for t in item if not 0 <= t < served.vocab_size), None)
        if outside is not None:
            raise bad("prompt", f"{where}token id {outside} is outside the vocabulary of {served.vocab_size}")
        ids, text = list(item), served.tok.decode(item)
    if not ids:
        raise bad("prompt", f"{where}is empty and the tokenizer has no end-of-text token to start from")
    if len(ids) > limit:
        raise bad("prompt", f"{where}is {len(ids)} tokens, more than the model's context of {served.block_size}",
                  "context_length_exceeded")
    return Prompt(ids, text)


def _most_logprobs(served):
    return min(served.max_logprobs, served.vocab_size)


def _check_rows(n_prompts, n, served):
    if n_prompts * n > served.max_rows:
        raise bad("n" if n > 1 else "prompt", f"{n_prompts} prompt(s) x n={n} is {n_prompts * n} rows, more "
                                              f"than this server's max_rows={served.max_rows}")


# ---------------------------------------------------------------- requests


def _sampling(body, served, max_tokens_default, min_tokens):
    n = _integer(body, "n", 1, 1, served.max_rows)
    _refuse_unsupported(body, n)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return dict(n=n, max_tokens=_integer(body, key, max_tokens_default, min_tokens, served.max_tokens),
                temperature=_number(body, "temperature", 1.0, 0, 100), top_p=_number(body, "top_p", 1.0, 1e-9, 1),
                top_k=max(0, _integer(body, "top_k", 0, -1, 2 ** 31)), stop=_stop(body), seed=_seed(body),
                tokens_as_ids=_boolean(body, "return_tokens_as_token_ids", served.tokens_as_ids))


def parse_completion(body, served):
    """A /v1/completions body -> Request; ApiError names the first bad field."""
    _model(body, served)
    echo = _boolean(body, "echo", False)
    fields = _sampling(body, served, 16, 0)
    if fields["max_tokens"] == 0 and not echo:
        raise bad("max_tokens", "0 asks for nothing: give at least 1 (0 only with echo=true)")
    logprobs = body.get("logprobs")
    logprobs = None if logprobs is None else _integer(body, "logprobs", 0, 0, _most_logprobs(served))
    # scoring alone never feeds the last token: a full context plus one fits (engine.prompt_logprobs)
    limit = served.block_size + (fields["max_tokens"] == 0)
    items = _prompt_items(body)
    _check_rows(len(items), fields["n"], served)
    prompts = [_prompt(x, served, limit, f"prompt {i} " if len(items) > 1 else "") for i, x in enumerate(items)]
    stream, usage = _stream(body)
    return Request(chat=False, prompts=prompts, stop_ids=served.stop_ids, logprobs=logprobs, echo=echo,
                   stream=stream, include_usage=usage, **fields)


def _messages(body):
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "is required: a list of {role, content} objects", "missing")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"must be an object with role and content, not {_kind(m)}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise bad(f"{where}.role", "must be a string such as system, user or assistant")
        content = _given(m, "content", "")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"{where}.content", "only text parts ({type: text, text}) are understood")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content", f"must be a string or a list of text parts, not {_kind(content)}")
        out.append(dict(role=m["role"], content=content))
    return out


def parse_chat(body, served):
    """A /v1/chat/completions body -> Request (one prompt: the rendered conversation)."""
    from jinja2 import TemplateError

    from chat import TemplateRefused
    _model(body, served)
    if served.chat is None:
        raise ApiError(400, f"model {served.name!r} has no chat template: use /v1/completions, or serve "
                            f"it with chat_template=FILE", "messages", "no_chat_template")
    messages = _messages(body)
    fields = _sampling(body, served, served.max_tokens, 1)
    logprobs = None
    if _boolean(body, "logprobs", False):
        logprobs = _integer(body, "top_logprobs", 0, 0, _most_logprobs(served))
    elif body.get("top_logprobs") is not None:
        raise bad("top_logprobs", "needs logprobs=true")
    try:
        text = served.chat.render(messages)
    except TemplateRefused as e:
        raise bad("messages", f"the chat template refuses them: {e}") from None
    except TemplateError as e:
        raise bad("messages", f"the chat template {served.chat.where} fails on them: {e}") from None
    prompt = _prompt(served.tok.encode_special(text), served, served.block_size, "the conversation ")
    stream, usage = _stream(body)
    return Request(chat=True, prompts=[Prompt(prompt.ids, text)], stop_ids=served.chat_stop_ids,
                   logprobs=logprobs, echo=False, stream=stream, include_usage=usage, **fields)


# ---------------------------------------------------------------- responses


class Namer:
    """Token names and texts for log-probs, per request."""

    def __init__(self, tok, as_ids):
        self.tok, self.as_ids = tok, as_ids

    def text(self, i):
        return self.tok.decode([i])

    def name(self, i):
        return f"token_id:{i}" if self.as_ids else self.text(i)


def completion_logprobs(entries, namer, offset):
    """OpenAI's legacy logprobs object of [(id, logprob or None, top [(id, logprob)] or None)];
    text offsets count from `offset`."""
    offsets = []
    for i, _, _ in entries:
        offsets.append(offset)
        offset += len(namer.text(i))
    return dict(tokens=[namer.name(i) for i, _, _ in entries], token_logprobs=[lp for _, lp, _ in entries],
                top_logprobs=[None if top is None else {namer.name(t): v for t, v in top} for _, _, top in entries],
                text_offset=offsets)


def chat_logprobs(entries, namer):
    def one(i, lp):
        return dict(token=namer.name(i), logprob=lp, bytes=list(namer.text(i).encode("utf-8")))
    return dict(content=[dict(one(i, lp), top_logprobs=[one(t, v) for t, v in top or []]) for i, lp, top in entries])


def logprobs_json(req, entries, namer, offset):
    if req.logprobs is None:
        return None
    return chat_logprobs(entries, namer) if req.chat else completion_logprobs(entries, namer, offset)


def usage(req, choices):
    prompt = sum(len(p.ids) for p in req.prompts)
    completion = sum(len(c.ids) for c in choices)
    return dict(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def response(req, choices, head, namer):
    """The whole answer of a request that does not stream. head: id, created and model."""
    out = []
    for c in choices:
        entries = (c.prompt_entries() if req.echo else []) + c.entries()
        text = (c.prompt.text if req.echo else "") + c.text
        one = dict(index=c.index, logprobs=logprobs_json(req, entries, namer, 0), finish_reason=c.finish_reason)
        out.append(dict(one, message=dict(role="assistant", content=text)) if req.chat else dict(one, text=text))
    return _headed(head, "chat.completion" if req.chat else "text_completion", choices=out, usage=usage(req, choices))


def chunk(req, head, namer, index, text, entries, offset, finish_reason, first=False):
    """One streamed piece of choice `index`: its new text, the entries of its new tokens, and its
    finish_reason once it is done."""
    one = dict(index=index, logprobs=logprobs_json(req, entries, namer, offset), finish_reason=finish_reason)
    if req.chat:
        delta = dict(role="assistant", content=text) if first else ({"content": text} if text else {})
        return _headed(head, "chat.completion.chunk", choices=[dict(one, delta=delta)])
    return _headed(head, "text_completion", choices=[dict(one, text=text)])


def usage_chunk(req, head, choices):
    return _headed(head, "chat.completion.chunk" if req.chat else "text_completion", choices=[],
                   usage=usage(req, choices))


def _headed(head, kind, **fields):
    return dict(id=head["id"], object=kind, created=head["created"], model=head["model"], **fields)
