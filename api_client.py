"""A teacher behind an OpenAI-compatible endpoint (serve.py, vLLM, SGLang, a hosted API), as
sample.py and cache_teacher.py use it: requests in parallel, retried with exponential backoff on
429, 5xx and lost connections, counted against a budget, and the key read from the environment.

The key is read from the variable api_key_env names and handed to the client only: it is never
printed, logged or written into a file. A request the endpoint refuses (400, 401, 404, ...) is not
retried: its message ends the run as one line, after the answers already received are written.
"""
import math
import os
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np

from configurator import UserError

API_DEFAULTS = dict(
    api_base="",  # an OpenAI-compatible endpoint, e.g. http://localhost:8000/v1: the teacher answers there
    model="",  # the model's name at api_base
    api_key_env="OPENAI_API_KEY",  # the environment variable holding api_base's key (never printed or saved)
    concurrency=8,  # requests in flight at once
    max_requests=0,  # requests to send at most, retries included (0: no limit); a rerun continues
    retries=6,  # attempts after the first on 429, 5xx and lost connections
    backoff=1.0,  # seconds before the first retry, doubled for each further one (at most 60)
    timeout=600.0,  # seconds one request may take
)
API_LIMITS = dict(concurrency="[1, inf)", max_requests="[0, inf)", retries="[0, inf)", backoff="[0, inf)",
                  timeout="(0, inf)")
MAX_WAIT_S = 60.0
TOKEN_ID = "token_id:"  # vLLM's names for tokens under return_tokens_as_token_ids


class BudgetSpent(Exception):
    """max_requests were sent: what is done is kept, a rerun goes on."""


class Endpoint:
    def __init__(self, cfg):
        import openai
        if not cfg["model"]:
            raise UserError(f"api_base={cfg['api_base']} needs model=, the name the endpoint serves the teacher "
                            f"under (GET {cfg['api_base'].rstrip('/')}/models lists them)")
        self.openai, self.base, self.model = openai, cfg["api_base"], cfg["model"]
        self.key_env = cfg["api_key_env"]
        # an endpoint without keys ignores the header; the client library insists on some value
        key = os.environ.get(self.key_env) or "none"
        self.client = openai.OpenAI(base_url=self.base, api_key=key, max_retries=0, timeout=cfg["timeout"])
        self.concurrency, self.retries, self.backoff = cfg["concurrency"], cfg["retries"], cfg["backoff"]
        self.budget, self.sent, self.spent = cfg["max_requests"], 0, False
        self.lock = threading.Lock()

    def _take(self):
        with self.lock:
            if self.budget and self.sent >= self.budget:
                self.spent = True
                raise BudgetSpent
            self.sent += 1

    def complete(self, **params):
        """A completion of self.model (openai's Completion), retried as the module says."""
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self._delay(attempt, last))
            self._take()
            try:
                return self.client.completions.create(model=self.model, **params)
            except self.openai.APIStatusError as e:
                if e.status_code != 429 and e.status_code < 500:
                    raise UserError(self._refusal(e)) from None
                last = e
            except self.openai.APIConnectionError as e:
                last = e
        raise UserError(f"{self.base}: no answer after {self.retries + 1} attempts (last: {self._describe(last)}); "
                        f"rerun the same command to continue, or raise retries=")

    def _delay(self, attempt, error):
        """Exponential backoff with jitter, so clients that failed together do not retry together;
        a 429's Retry-After is honoured when it asks for longer."""
        delay = min(MAX_WAIT_S, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
        response = getattr(error, "response", None)
        try:
            asked = float(response.headers.get("retry-after", 0)) if response is not None else 0.0
        except ValueError:  # an HTTP date: the backoff stands
            asked = 0.0
        return max(delay, min(asked, MAX_WAIT_S))

    @staticmethod
    def _describe(error):
        status = getattr(error, "status_code", None)
        return f"{status} {_message(error)}" if status else f"{type(error).__name__}: {error}"

    def _refusal(self, error):
        hint = {401: f"; set the key in ${self.key_env} (api_key_env= names another variable)",
                404: f"; is model={self.model} served there?"}.get(error.status_code, "")
        return f"{self.base} refused the request ({error.status_code}: {_message(error)}){hint}"

    def map(self, fn, items):
        """(item, fn(item)) for items as their answers come, `concurrency` at a time. Submitting
        stops once the budget is spent or a request failed; the answers in flight are still handed
        back, then the failure is raised."""
        items, running, failure, end = iter(items), {}, None, object()
        with ThreadPoolExecutor(self.concurrency) as pool:
            def fill():
                while failure is None and not self.spent and len(running) < self.concurrency:
                    item = next(items, end)
                    if item is end:
                        return
                    running[pool.submit(fn, item)] = item
            fill()
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    item = running.pop(future)
                    try:
                        result = future.result()
                    except BudgetSpent:
                        continue
                    except Exception as e:  # noqa: BLE001 - raised below, once the others are in
                        failure = failure or e
                        continue
                    yield item, result
                fill()
        if failure is not None:
            raise failure


def _message(error):
    body = getattr(error, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or getattr(error, "message", error))[:300]


def _token_id(name, base):
    if not (isinstance(name, str) and name.startswith(TOKEN_ID) and name[len(TOKEN_ID):].isdigit()):
        raise UserError(f"{base} names tokens by their text ({name!r}), not by id: it must honour "
                        f"return_tokens_as_token_ids (vLLM: --return-tokens-as-token-ids)")
    return int(name[len(TOKEN_ID):])


def prompt_top_k(completion, sent, k, vocab_size, base):
    """From the answer to an echo request (max_tokens=0, logprobs=k, token ids as names): for every
    token of `sent` after the first, its top-k log-probs in descending order and the log of the
    mass outside them, (len(sent) - 1, k + 1) float32, and their ids, (len(sent) - 1, k) int32.

    The mass outside is log(1 - sum(exp(top))), summed in float64 from the float32 values the
    endpoint sends (JSON numbers carry them exactly); cache_teacher.py computes it from the terms
    themselves, so the two agree to float32 rounding of the top values, not bit for bit."""
    logprobs = completion.choices[0].logprobs if completion.choices else None
    if logprobs is None or not logprobs.tokens or not logprobs.top_logprobs:
        raise UserError(f"{base} returned no log-probs for the prompt: it must answer echo=true with "
                        f"logprobs and max_tokens=0 (serve.py and vLLM do)")
    echoed = [_token_id(name, base) for name in logprobs.tokens[:len(sent)]]
    if echoed != list(sent):
        raise UserError(f"{base} echoed other tokens than those sent: it does not take the prompt as token ids")
    values = np.empty((len(sent) - 1, k + 1), np.float32)
    ids = np.empty((len(sent) - 1, k), np.int32)
    for t, top in enumerate(logprobs.top_logprobs[1:len(sent)]):
        if top is None or len(top) < k:
            raise UserError(f"{base} returned {len(top or ())} log-probs per token, fewer than top_k={k}: lower "
                            f"top_k or raise its limit (serve.py max_logprobs=, vLLM --max-logprobs)")
        # a stable sort keeps the endpoint's order among equal values; vLLM adds the prompt's own
        # token beyond the top k, which the cut drops
        best = sorted(((v, _token_id(name, base)) for name, v in top.items()), key=lambda p: -p[0])[:k]
        values[t, :k] = [v for v, _ in best]
        ids[t] = [i for _, i in best]
    if ids.size and ids.max() >= vocab_size:
        raise UserError(f"{base} returned token id {ids.max()}, outside the dataset's vocabulary of {vocab_size}: "
                        f"the endpoint's model has another tokenizer")
    with np.errstate(divide="ignore", invalid="ignore"):
        outside = 1.0 - np.exp(values[:, :k].astype(np.float64)).sum(axis=1)
        values[:, k] = np.where(outside > 0, np.log(np.maximum(outside, 0.0)), -math.inf)
    return values, ids
