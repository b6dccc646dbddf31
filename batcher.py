"""Requests batched through engine.generate. One worker thread owns the model: it takes the first
queued request, waits a few milliseconds for others, scores the prompts to echo one at a time,
then generates the rows of every request whose sampling settings agree in one engine call.

Each row samples from its own generator, seeded from its request's seed and its place in the
request, so a seeded request gives the same text whatever is batched beside it (up to the rounding
of batched matmuls, see engine.py). Rows of one group share max_tokens too: the engine draws a row's
uniform numbers max_new_tokens at a time. A prompt is scored alone, with the shapes cache_teacher.py
uses for a window, so its log-probs never depend on the batch either.

Tokens reach each request as the engine chooses them (on_token): a row ends at an end-of-text id,
a stop string, max_tokens, or when its client has gone, and the engine stops computing a batch once
all of its rows have ended.
"""
import asyncio
import queue
import threading
import time
import traceback

import torch

import engine


class Choice:
    """One row of a request as it is generated: ids, log-probs, and text decoded as the tokens come
    (a character split across byte-level tokens waits for its last byte), cut at a stop string."""

    def __init__(self, index, prompt, req, tok):
        self.index, self.prompt, self.req, self.tok = index, prompt, req, tok
        self.ids, self.logprobs, self.tops = [], [], []
        self.scores = None  # (logprobs, top) of the prompt, when it is echoed
        self.text, self.sent = "", 0  # the text so far; how much of it was streamed
        self.finish_reason = None
        self.start, self.read = 0, 0  # ids[start:read] are decoded context for the next piece
        # streamed text stays this many characters behind: they might begin a stop string
        self.hold = max(map(len, req.stop), default=1) - 1

    def add(self, token, logprob, top):
        """Take the row's next token; True once the row is finished."""
        if token in self.req.stop_ids:
            return self.finish("stop")
        self.ids.append(token)
        self.logprobs.append(logprob)
        self.tops.append(top)
        before = len(self.text)
        self.text += self._decoded()
        hits = [i for s in self.req.stop if (i := self.text.find(s, max(0, before - self.hold))) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason = "stop"
            return True
        return self.finish("length") if len(self.ids) == self.req.max_tokens else False

    def _decoded(self):
        """The text the newest ids add. Decoding the last piece again beside the new ids keeps
        tokenizers that strip a leading space right; a piece ending in U+FFFD waits for its bytes."""
        prefix = self.tok.decode(self.ids[self.start:self.read])
        full = self.tok.decode(self.ids[self.start:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.start, self.read = self.read, len(self.ids)
        return full[len(prefix):]

    def finish(self, reason):
        self.text = self.tok.decode(self.ids)  # the whole text, bytes still pending included
        self.finish_reason = reason
        return True

    def pending(self):
        """Text not streamed yet that can no longer turn out to be part of a stop string."""
        end = len(self.text) if self.finish_reason else max(self.sent, len(self.text) - self.hold)
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def entries(self, start=0):
        """[(id, logprob, top)] of the generated tokens from `start` on."""
        return list(zip(self.ids[start:], self.logprobs[start:], self.tops[start:]))

    def prompt_entries(self):
        """The same for the echoed prompt: its first token has no log-prob."""
        logprobs, top = self.scores
        return [(self.prompt.ids[0], None, None)] + list(zip(self.prompt.ids[1:], logprobs, top or [None] * len(logprobs)))


class Job:
    """A request on its way through the batcher. Its events go to the handler's asyncio queue:
    ("piece", choice index, text, entries, finish_reason) while streaming, then ("end",) or
    ("error", message)."""

    def __init__(self, req, tok, loop):
        self.req = req
        rows = req.rows()
        self.choices = [Choice(r, prompt, req, tok) for r, (prompt, _) in enumerate(rows)]
        self.seeds = [seed for _, seed in rows]
        self.loop, self.events = loop, asyncio.Queue()
        self.cancelled, self.error = False, None

    def emit(self, *event):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass

    def cancel(self):
        self.cancelled = True

    def stream(self, choice, entries):
        if not self.req.stream:
            return
        text = choice.pending()
        if text or choice.finish_reason or (entries and self.req.logprobs is not None):
            self.emit("piece", choice.index, text, entries, choice.finish_reason)


class Batcher:
    def __init__(self, model, rt, batch_rows, wait_s):
        self.model, self.rt, self.batch_rows, self.wait_s = model, rt, batch_rows, wait_s
        self.queue = queue.Queue()
        self.active = 0  # requests taken from the queue and not yet answered
        self.tokens = 0  # tokens generated since the start
        self.stopping = False
        self.thread = threading.Thread(target=self._work, name="batcher", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        """Every row ends at its next token; every request queued is answered, then the worker ends."""
        self.stopping = True
        self.queue.put(None)
        self.thread.join()

    def submit(self, job):
        self.queue.put(job)

    def stats(self):
        return dict(queued=self.queue.qsize(), active=self.active, tokens=self.tokens)

    def _work(self):
        while (first := self.queue.get()) is not None:
            jobs = self._gather(first)
            self.active += len(jobs)
            try:
                self._run(jobs)
            finally:
                for job in jobs:
                    self.active -= 1
                    job.emit(*(("error", job.error) if job.error else ("end",)))

    def _gather(self, first):
        """The first job and those that come within wait_s, up to batch_rows rows (more when they
        are already queued: the groups are cut to batch_rows later)."""
        jobs, rows = [first], len(first.choices)
        deadline = time.monotonic() + self.wait_s
        while rows < self.batch_rows:
            try:
                job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # stop() was asked: leave the sentinel for the loop
                self.queue.put(None)
                break
            jobs.append(job)
            rows += len(job.choices)
        return jobs

    def _run(self, jobs):
        live = [job for job in jobs if not (job.cancelled or self.stopping)]
        for job in live:
            if job.req.echo:
                self._guarded([job], self._score, job)
        groups = {}
        for job in live:
            for choice in job.choices:
                if choice.finish_reason is None and job.error is None:
                    groups.setdefault(job.req.sampling, []).append((job, choice))
        for sampling, rows in groups.items():
            for i in range(0, len(rows), self.batch_rows):
                part = rows[i:i + self.batch_rows]
                self._guarded({job for job, _ in part}, self._generate, sampling, part)

    def _guarded(self, jobs, fn, *args):
        """fn(*args); a failure fails these jobs, never the server."""
        try:
            fn(*args)
        except Exception as e:
            traceback.print_exc()
            for job in jobs:
                job.error = f"{type(e).__name__}: {e}"

    def _score(self, job):
        req = job.req
        for p, prompt in enumerate(req.prompts):
            with self.rt.autocast():
                scores = engine.prompt_logprobs(self.model, prompt.ids, req.logprobs or 0)
            for choice in job.choices[p * req.n:(p + 1) * req.n]:
                choice.scores = scores
                if req.max_tokens == 0:
                    choice.finish("length")
                if req.stream:
                    job.emit("piece", choice.index, prompt.text, choice.prompt_entries(), choice.finish_reason)

    def _generate(self, sampling, rows):
        temperature, top_k, top_p, max_tokens = sampling
        k = max(job.req.logprobs or 0 for job, _ in rows)

        def on_token(row, token, logprob, top=None):
            job, choice = rows[row]
            if job.cancelled or self.stopping:
                return True
            self.tokens += 1
            n = len(choice.ids)
            asked = job.req.logprobs
            done = choice.add(token, logprob, None if top is None or asked is None else top[:asked])
            job.stream(choice, choice.entries(n))
            return done

        gens = [torch.Generator(self.rt.device).manual_seed(job.seeds[c.index]) for job, c in rows]
        with self.rt.autocast():
            engine.generate(self.model, [c.prompt.ids for _, c in rows], max_tokens, 1, temperature, top_k, top_p,
                            generator=gens, logprobs=k, on_token=on_token, stream_top=True)
