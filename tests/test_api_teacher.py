"""A teacher behind an OpenAI-compatible endpoint (serve.py on loopback): sample.py api_base= writes
the file sample.py writes from the checkpoint itself, through 429s, 500s and dropped connections, a
kill -9 and a spent request budget; cache_teacher.py api_base= writes the top-k columns of the
local cache bit for bit; refusals are one line, and the key is never shown."""
import http.client
import itertools
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from random import Random
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch

import cache_teacher
import checkpoint
import sample
from configurator import run
from conftest import CHARS, ROOT, ServeProcess, kill_at_lines, make_char_dataset, run_script, save_model
from data import BinDataset
from teacher_cache import TeacherCache

KEY = "sk-test-fedcba9876543210"
ENV = {"OPENAI_API_KEY": KEY}
T, K = 32, 8


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny model made confident (its tied head scaled): its top 8 tokens hold 95-99.9% of the
    mass, so the rest's log-mass is small and computed from nearly cancelling terms."""
    folder = tmp_path_factory.mktemp("teacher")
    model = save_model(folder, len(CHARS), dict(tokenizer="char", vocab_size=len(CHARS), chars=CHARS))
    with torch.no_grad():
        model.transformer.wte.weight.mul_(16)
    checkpoint.save(dict(model=model.state_dict(), model_args=model.config.to_dict(), config={}, step=0,
                         best_val_loss=float("inf"), tokenizer=dict(tokenizer="char", vocab_size=len(CHARS), chars=CHARS)),
                    str(folder), step=0, keep_last=1)
    return str(folder)


@pytest.fixture(scope="module")
def server(teacher, tmp_path_factory):
    proc = ServeProcess(tmp_path_factory.mktemp("serve") / "serve.log", f"source={teacher}", "name=teacher",
                        "api_key_env=OPENAI_API_KEY", env=ENV)
    yield proc
    proc.close()


class FaultyProxy:
    """Forwards requests to `upstream`, but answers request number n (from 0) with faults[n]
    instead: an HTTP status, or "drop" to close the connection without a word."""

    def __init__(self, upstream, faults):
        target, count, self.seen = urlsplit(upstream), itertools.count(), []
        lock, proxy = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    n = next(count)
                fault = faults.get(n)
                proxy.seen.append(fault or 200)
                if fault == "drop":
                    self.close_connection = True
                    return
                if fault:
                    status, data = fault, json.dumps({"error": {"message": "injected", "type": "server_error",
                                                                "param": None, "code": None}}).encode()
                else:
                    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
                    conn.request("POST", self.path, body, {k: v for k, v in self.headers.items()
                                                           if k.lower() in ("content-type", "authorization")})
                    answer = conn.getresponse()
                    status, data = answer.status, answer.read()
                    conn.close()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def prompts_file(path, n):
    words = ["ROMEO:", "O", "Is it so?", "Hi", "What, ho!", "Nay"]
    prompts = [" ".join(words[(i * 7 + k) % len(words)] for k in range(1 + i % 3)) for i in range(n)]
    path.write_text("".join(json.dumps(dict(prompt=p, id=f"p{i}")) + "\n" for i, p in enumerate(prompts)))
    return path


SAMPLING = ["num_samples=3", "max_new_tokens=20", "temperature=2.0", "top_k=30", "top_p=0.95", "seed=11"]


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def in_process(script, args, capsys):
    """(exit status, stdout, stderr) of a script run here: nothing it does with an endpoint needs
    a process of its own, and starting one costs seconds."""
    try:
        status = run(script.main, script.DEFAULTS, script.LIMITS, list(map(str, args)))
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def sample_api(url, capsys, *args):
    return in_process(sample, [f"api_base={url}", "model=teacher", "backoff=0.01", *SAMPLING, *args], capsys)


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory):
    """60 prompts, and what sample.py writes for them from the teacher's checkpoint."""
    tmp = tmp_path_factory.mktemp("reference")
    prompts, local = prompts_file(tmp / "p.jsonl", 60), tmp / "local.jsonl"
    run_script("sample.py", f"source={teacher}", f"prompts={prompts}", f"out={local}", *SAMPLING, "batch_size=8")
    return prompts, local.read_bytes()


def test_sample_from_the_server_equals_sample_from_the_checkpoint(server, reference, tmp_path, key, capsys):
    prompts, expected = reference
    remote = tmp_path / "remote.jsonl"
    proxy = FaultyProxy(server.url, {0: 429, 3: 500, 4: "drop", 9: 503, 10: 503})
    try:
        status, out, err = sample_api(proxy.url, capsys, f"prompts={prompts}", f"out={remote}", "concurrency=4")
    finally:
        proxy.close()
    assert status == 0 and remote.read_bytes() == expected
    recs = [json.loads(line) for line in expected.decode().splitlines()]
    assert len(recs) == 180 and list(recs[0]) == ["prompt", "response", "id", "index", "sample"]
    assert len({r["response"] for r in recs}) > 150  # sampled, not one text over and over
    # every fault was retried: 60 answers after 5 faults
    assert sorted(map(str, proxy.seen)) == sorted(["200"] * 60 + ["429", "500", "drop", "503", "503"])
    assert KEY not in out + err + remote.read_text()

    # a prompt whose first sample is already written is asked for its other two only
    partial = tmp_path / "partial.jsonl"
    partial.write_bytes(b"".join(expected.splitlines(keepends=True)[:4]))
    sample_api(server.url, capsys, f"prompts={prompts}", f"out={partial}")
    assert partial.read_bytes() == expected


def test_killed_and_budgeted_runs_resume_into_the_same_file(server, reference, tmp_path, key, capsys):
    prompts, expected = reference

    killed = tmp_path / "killed.jsonl"
    args = [sys.executable, os.path.join(ROOT, "sample.py"), f"api_base={server.url}", "model=teacher",
            f"prompts={prompts}", f"out={killed}", "concurrency=2", *SAMPLING]
    kill_at_lines(args, killed, 30, env=ENV)
    assert 30 <= killed.read_bytes().count(b"\n") < 180
    assert sample_api(server.url, capsys, f"prompts={prompts}", f"out={killed}", "concurrency=3")[0] == 0
    assert killed.read_bytes() == expected

    budgeted = tmp_path / "budgeted.jsonl"
    for want in (120, 180):  # 60 prompts, a request each, 40 requests a run
        status, _, err = sample_api(server.url, capsys, f"prompts={prompts}", f"out={budgeted}", "max_requests=40",
                                    "concurrency=5")
        assert status == 0 and budgeted.read_bytes().count(b"\n") == want
        assert ("max_requests=40 spent: 60 records to go; rerun the same command" in err) == (want < 180)
    assert budgeted.read_bytes() == expected


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A dataset of the teacher's 61 characters: 3,000 of them drawn at random, after one of each."""
    text = CHARS + "".join(Random(0).choice(CHARS) for _ in range(3000))
    return make_char_dataset(str(tmp_path_factory.mktemp("api_data") / "d"), text)


CACHE = [f"block_size={T}", f"top_k={K}", "cache_dtype=float32"]


def test_cache_from_the_server_equals_the_local_cache(server, teacher, data, tmp_path, key, capsys):
    local, remote = tmp_path / "local", tmp_path / "remote"
    # batch_size=1: the local forward has the shapes the server's per-request scoring has
    run_script("cache_teacher.py", *CACHE, f"teacher={teacher}", f"dataset={data}", f"out={local}", "batch_size=1")
    api = [*CACHE, f"api_base={server.url}", "model=teacher", f"dataset={data}", f"out={remote}", "batch_size=4",
           "concurrency=4"]
    status, out, err = in_process(cache_teacher, [*api, "max_requests=30"], capsys)
    assert status == 0 and "max_requests=30 spent" in out
    assert not json.loads((remote / "meta.json").read_text())["complete"]
    assert in_process(cache_teacher, api, capsys)[0] == 0
    ours, theirs = TeacherCache(str(local)), TeacherCache(str(remote))
    assert theirs.meta["teacher"]["sources"] == [f"teacher@{server.url}"] and theirs.windows == ours.windows == 86
    theirs.check(BinDataset(data), T)
    assert (tmp_path / "remote" / "ids.bin").read_bytes() == (tmp_path / "local" / "ids.bin").read_bytes()
    a, b = np.asarray(ours.logp), np.asarray(theirs.logp)
    assert np.array_equal(a[:, :K], b[:, :K])  # the top-k log-probs, bit for bit
    # the rest's log-mass: 1 - sum(top) here, from its own terms locally. The top values carry
    # float32's rounding of logit - normaliser (~|logit| x 6e-8 each), which 1 - sum(top) divides by
    # the rest's small mass: apart by up to 0.0012 here, under float16's step of 0.0039 at -5
    rest = np.exp(a[:, K].astype(np.float64))
    assert rest.min() < 1e-3 and np.abs(a[:, K] - b[:, K]).max() < 2e-3
    assert KEY not in out + err + json.dumps(theirs.meta)


def test_refusals_are_one_line(server, teacher, data, tmp_path, key, capsys):
    prompts = prompts_file(tmp_path / "p.jsonl", 3)
    out = tmp_path / "o.jsonl"
    (tmp_path / "long.txt").write_text("O" * 40 + "\n")

    def refused(script, args, message):
        status, stdout, stderr = in_process(script, args, capsys)
        assert status == 2 and stderr.splitlines()[-1].startswith("error: ") and message in stderr.splitlines()[-1], \
            stderr
        assert KEY not in stdout + stderr
    api = [f"api_base={server.url}", "model=teacher", "backoff=0.01"]
    for args, message in [
            (["model=nobody"], "refused the request (404: model: 'nobody' does not exist; this server serves "
                               "'teacher'); is model=nobody served there?"),
            (["api_key_env=NANODISTILL_NO_SUCH_KEY"], "refused the request (401: invalid or missing API key"),
            ([f"prompts={tmp_path / 'long.txt'}"], "(400: prompt: is 40 tokens, more than the model's context of 32)"),
            (["model="], "needs model=, the name the endpoint serves the teacher under")]:
        refused(sample, [*api, f"prompts={prompts}", f"out={out}", *args], message)
    proxy = FaultyProxy(server.url, {n: 503 for n in range(100)})
    try:
        refused(sample, [*api, f"api_base={proxy.url}", "retries=2", f"prompts={prompts}", f"out={out}"],
                "no answer after 3 attempts (last: 503 injected)")
    finally:
        proxy.close()
    assert not out.exists()
    for args, message in [(["top_k=0"], "top_k=0 keeps whole distributions"),
                          ([f"teacher={teacher}"], "give one of them")]:
        refused(cache_teacher, [*CACHE, *api, f"dataset={data}", f"out={tmp_path / 'c'}", *args], message)
