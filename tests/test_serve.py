"""serve.py on loopback, a tiny char model behind it: completions that are the engine's own (greedy,
seeded sampling, echoed prompt log-probs), streams that add up to the answer, chat through a
template, a 4xx naming the field for every bad request, the key, 32 clients x 20 requests with
seeded rows independent of their batch, and a stream its client cuts, whose rows stop."""
import json
import socket
import threading
import time
from collections import defaultdict

import httpx
import openai
import pytest
import torch

import checkpoint
import engine
from conftest import ServeProcess
from runtime import Runtime
from server import SETTINGS, InThread, build
from tokenizer import tokenizer_from_meta

KEY_ENV, KEY = "NANODISTILL_TEST_SERVE_KEY", "sk-test-0123456789abcdef"
TEMPLATE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def model(char_ckpt):
    m, info, _ = checkpoint.load_model(char_ckpt)
    return m.eval(), tokenizer_from_meta(info)


@pytest.fixture(scope="module")
def server(char_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "chat.jinja").write_text(TEMPLATE)
    proc = ServeProcess(tmp / "serve.log", f"source={char_ckpt}", "name=tiny", f"api_key_env={KEY_ENV}",
                        f"chat_template={tmp / 'chat.jinja'}", "max_tokens=1000", env={KEY_ENV: KEY})
    yield proc
    proc.close()
    assert KEY not in proc.output()


def client(server, key=KEY):
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=120)


def post(server, path, body):
    with client(server) as c:
        return c.post(path, json=body)


def health(server):
    return httpx.get(server.url[:-len("/v1")] + "/health").json()


def events(response):
    """The server-sent events of a streamed answer, [DONE] last."""
    out = [line[len("data: "):] for line in response.iter_lines() if line]
    assert out[-1] == "[DONE]" and all(line.startswith("{") for line in out[:-1])
    return [json.loads(line) for line in out[:-1]]


def offsets(tok, ids, start=0):
    out = []
    for i in ids:
        out.append(start)
        start += len(tok.decode([i]))
    return out


def test_completions_are_the_engines_own(server, model):
    m, tok = model
    r = post(server, "/completions", dict(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0)).json()
    greedy = engine.generate(m, [tok.encode("ROMEO:")], 20, temperature=0)[0]
    assert r["object"] == "text_completion" and r["model"] == "tiny"
    assert r["choices"] == [dict(index=0, logprobs=None, finish_reason="length", text=tok.decode(greedy.tokens))]
    assert r["usage"] == dict(prompt_tokens=6, completion_tokens=20, total_tokens=26)

    # two prompts (text and ids) x n=2, sampled: row r draws from seed + r, as engine.generate with
    # one generator per row does; the prompts echoed with their log-probs, tokens named by id
    prompts = [tok.encode("ROMEO:"), [5, 6, 7]]
    body = dict(model="tiny", prompt=["ROMEO:", [5, 6, 7]], n=2, max_tokens=12, temperature=0.9, top_k=20,
                top_p=0.95, seed=41, logprobs=3, echo=True, return_tokens_as_token_ids=True)
    r = post(server, "/completions", body).json()
    rows = [p for p in prompts for _ in range(2)]
    ref = engine.generate(m, rows, 12, 1, 0.9, 20, 0.95, generator=[torch.Generator().manual_seed(41 + i) for i in range(4)],
                          logprobs=3)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3] and len({c["text"] for c in r["choices"]}) == 4
    for c, want, p in zip(r["choices"], ref, rows):
        assert c["text"] == tok.decode(p) + tok.decode(want.tokens)
        lp = c["logprobs"]
        assert lp["tokens"] == [f"token_id:{i}" for i in p + want.tokens]
        assert lp["text_offset"] == offsets(tok, p + want.tokens)
        chosen, top = engine.prompt_logprobs(m, p, 3)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        torch.testing.assert_close(lp["token_logprobs"][1:], chosen + want.logprobs, atol=1e-5, rtol=0)
        names = [[f"token_id:{i}" for i, _ in alts] for alts in top + want.top_logprobs]
        assert [list(d) for d in lp["top_logprobs"][1:]] == names
        torch.testing.assert_close([list(d.values()) for d in lp["top_logprobs"][1:]],
                                   [[v for _, v in alts] for alts in top + want.top_logprobs], atol=1e-5, rtol=0)

    # the official client reads the same answer
    ours = openai.OpenAI(base_url=server.url, api_key=KEY).completions.create(
        model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0)
    assert ours.choices[0].text == tok.decode(greedy.tokens)
    models = openai.OpenAI(base_url=server.url, api_key=KEY).models.list()
    assert [x.id for x in models.data] == ["tiny"]


def test_streams_add_up_to_the_answer_and_stop_strings_are_cut(server):
    body = dict(model="tiny", prompt=["ROMEO:", "O"], n=2, max_tokens=40, temperature=1.0, seed=7, logprobs=2,
                stop=["e", "a "])
    whole = post(server, "/completions", body).json()
    with client(server) as c, c.stream("POST", "/completions", json=dict(
            body, stream=True, stream_options=dict(include_usage=True))) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = events(r)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert "stop" in {c["finish_reason"] for c in whole["choices"]}
    for choice in whole["choices"]:
        assert "e" not in choice["text"] and "a " not in choice["text"]
        pieces = [e["choices"][0] for e in chunks[:-1] if e["choices"][0]["index"] == choice["index"]]
        assert "".join(p["text"] for p in pieces) == choice["text"]
        assert [p["finish_reason"] for p in pieces] == [None] * (len(pieces) - 1) + [choice["finish_reason"]]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert sum((p["logprobs"][key] for p in pieces), []) == choice["logprobs"][key], key
        if choice["finish_reason"] == "stop":  # the token that completed the stop string is kept in
            assert choice["logprobs"]["tokens"][-1] in ("e", " ")  # the log-probs, not in the text


def test_chat_through_the_template(server, model):
    m, tok = model
    messages = [dict(role="system", content="Be"), dict(role="user", content="Who?")]
    body = dict(model="tiny", messages=messages, max_tokens=10, temperature=0.8, seed=5)
    r = post(server, "/chat/completions", dict(body, logprobs=True, top_logprobs=2)).json()
    prompt = "system: Be\nuser: Who?\nassistant:"  # 31 characters of the model's 32
    same = post(server, "/completions", dict(model="tiny", prompt=prompt, max_tokens=10, temperature=0.8, seed=5)).json()
    assert r["object"] == "chat.completion"
    assert r["choices"][0]["message"] == dict(role="assistant", content=same["choices"][0]["text"])
    assert r["usage"] == same["usage"]
    content = r["choices"][0]["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == same["choices"][0]["text"]
    assert all(len(t["top_logprobs"]) == 2 and t["top_logprobs"][0]["logprob"] >= t["logprob"] for t in content)
    with client(server) as c, c.stream("POST", "/chat/completions", json=dict(body, stream=True)) as s:
        chunks = events(s)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in chunks) == same["choices"][0]["text"]

    # a model without a chat template is told so (served from a thread of this process)
    app = build(m, tok, Runtime(dict(device="cpu", dtype="float32")), "plain", SETTINGS)
    plain = InThread(app)
    try:
        r = httpx.post(plain.url + "/chat/completions", json=dict(model="plain", messages=messages))
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
        assert "has no chat template" in r.json()["error"]["message"]
        r = httpx.post(plain.url + "/completions", json=dict(model="plain", prompt="O", max_tokens=3, seed=5))
        assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 3
    finally:
        plain.close()


C, CHAT = "/completions", "/chat/completions"
BAD = [  # (path, body, status, param, words the message must hold)
    (C, b"{not json", 400, None, "not valid JSON"),
    (C, b'{"model": "tiny", "prompt": "O", "temperature": NaN}', 400, None, "NaN is not a JSON number"),
    (C, b"[1, 2]", 400, None, "must be a JSON object"),
    (C, dict(model="tiny"), 400, "prompt", "prompt: is required"),
    (C, dict(model="tiny", prompt=3), 400, "prompt", "must be a string, a list of token ids"),
    (C, dict(model="tiny", prompt=[]), 400, "prompt", "non-empty"),
    (C, dict(model="tiny", prompt="O", max_tokens="many"), 400, "max_tokens", "must be an integer, not a string"),
    (C, dict(model="tiny", prompt="O", max_tokens=10 ** 12), 400, "max_tokens", "between 0 and 1000, got 1000000000000"),
    (C, dict(model="tiny", prompt="O", max_tokens=0), 400, "max_tokens", "0 only with echo"),
    (C, dict(model="gpt-5", prompt="O"), 404, "model", "'gpt-5' does not exist; this server serves 'tiny'"),
    (C, dict(prompt="O"), 400, "model", "model: is required"),
    (C, dict(model="tiny", prompt="O", logprobs=1000), 400, "logprobs", "between 0 and 61"),  # the vocabulary
    (C, dict(model="tiny", prompt="O", logprobs=True), 400, "logprobs", "must be an integer, not a boolean"),
    (C, dict(model="tiny", prompt="O", temperature=-1), 400, "temperature", "between 0 and 100"),
    (C, dict(model="tiny", prompt="O", top_p=0), 400, "top_p", "between"),
    (C, dict(model="tiny", prompt="O", n=0), 400, "n", "between 1 and 64"),
    (C, dict(model="tiny", prompt="O", stop=["", "x"]), 400, "stop", "non-empty string"),
    (C, dict(model="tiny", prompt="O", stream="yes"), 400, "stream", "true or false"),
    (C, dict(model="tiny", prompt="O", stream_options=dict(include_usage=True)), 400, "stream_options", "stream=true"),
    (C, dict(model="tiny", prompt="O", seed="x"), 400, "seed", "must be an integer"),
    (C, dict(model="tiny", prompt="O", presence_penalty=0.5), 400, "presence_penalty", "not supported"),
    (C, dict(model="tiny", prompt=[5, 999]), 400, "prompt", "token id 999 is outside the vocabulary of 61"),
    (C, dict(model="tiny", prompt="O" * 33), 400, "prompt", "33 tokens, more than the model's context of 32"),
    (C, dict(model="tiny", prompt="~"), 400, "prompt", "character '~' is not in this char vocabulary"),
    (C, dict(model="tiny", prompt=["O"] * 65), 400, "prompt", "65 rows, more than this server's max_rows=64"),
    (C, dict(model="tiny", prompt=["O", 5]), 400, "prompt", "non-empty list of either"),
    (CHAT, dict(model="tiny"), 400, "messages", "messages: is required"),
    (CHAT, dict(model="tiny", messages=[]), 400, "messages", "non-empty list"),
    (CHAT, dict(model="tiny", messages=[dict(role="user", content=5)]), 400, "messages[0].content", "not an integer"),
    (CHAT, dict(model="tiny", messages=[dict(content="hi")]), 400, "messages[0].role", "must be a string"),
    (CHAT, dict(model="tiny", messages=[dict(role="user", content="O")], top_logprobs=2), 400, "top_logprobs",
     "needs logprobs=true"),
]


def test_bad_requests_get_a_4xx_naming_the_field(server):
    with client(server) as c:
        for path, body, status, param, words in BAD:
            r = c.post(path, content=body) if isinstance(body, bytes) else c.post(path, json=body)
            error = r.json()["error"]
            assert (r.status_code, error["param"]) == (status, param), (path, body, r.text)
            assert words in error["message"] and error["type"] == "invalid_request_error", (words, error)
        r = c.get("/nothing")
        assert r.status_code == 404 and "GET /v1/nothing" in r.json()["error"]["message"]
        assert c.post(C, json=dict(model="tiny", prompt="O", max_tokens=4)).status_code == 200
    for key in (None, "sk-wrong"):
        with client(server, key) as c:
            r = c.post(C, json=dict(model="tiny", prompt="O"))
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert c.get("/models").status_code == 401
    assert health(server)["status"] == "ok"  # no key needed, and still alive


def test_32_clients_x_20_requests_and_seeded_rows_ignore_their_batch(server, model):
    m, tok = model
    prompts = ["ROMEO:", "O", "Is it so?", "Nay, my lord", "Hi"]
    seeded = dict(max_tokens=8, temperature=1.0, top_p=0.9)
    alone = [tok.decode(engine.generate(m, [tok.encode(p)], 8, temperature=1.0, top_p=0.9,
                                        generator=[torch.Generator().manual_seed(100 + i)])[0].tokens)
             for i, p in enumerate(prompts)]
    failures, texts = [], defaultdict(set)

    def requests(k):
        with client(server) as c:
            for j in range(20):
                i, kind = (k + j) % len(prompts), (k + j) % 4
                body = dict(model="tiny", prompt=prompts[i])
                try:
                    if kind == 0:  # seeded: the same text whatever it is batched with
                        r = c.post(C, json=dict(body, seed=100 + i, **seeded))
                        assert r.status_code == 200, r.text
                        texts[i].add(r.json()["choices"][0]["text"])
                    elif kind == 1:
                        with c.stream("POST", C, json=dict(body, n=2, max_tokens=6, stream=True)) as r:
                            assert r.status_code == 200 and len(events(r)) >= 2
                    elif kind == 2:
                        r = c.post(C, json=dict(body, max_tokens=5, logprobs=2, echo=True))
                        assert r.status_code == 200, r.text
                        assert len(r.json()["choices"][0]["logprobs"]["tokens"]) == len(prompts[i]) + 5
                    else:
                        r = c.post(CHAT, json=dict(model="tiny", messages=[dict(role="user", content=prompts[i])],
                                                   max_tokens=4, temperature=0))
                        assert r.status_code == 200, r.text
                        assert r.json()["choices"][0]["message"]["role"] == "assistant"
                except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the others
                    failures.append(f"client {k} request {j}: {type(e).__name__}: {e}")

    clients = [threading.Thread(target=requests, args=(k,)) for k in range(32)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    assert failures == []
    assert dict(texts) == {i: {text} for i, text in enumerate(alone)}
    state = health(server)
    assert state["status"] == "ok" and state["queued"] == 0 and state["active"] == 0


def drained(server):
    """/health once no request is left in the server."""
    deadline = time.time() + 60
    while (state := health(server))["active"] and time.time() < deadline:
        time.sleep(0.05)
    assert state["active"] == 0 and state["queued"] == 0
    return state


def test_a_client_that_hangs_up_stops_its_rows(server):
    before = health(server)["tokens"]
    body = dict(model="tiny", prompt="ROMEO:", n=4, max_tokens=1000, seed=3)
    with client(server) as c, c.stream("POST", C, json=dict(body, stream=True)) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: {")
            if got == 3:
                break
    # the client has hung up mid-stream: its four rows end at their next token
    state = drained(server)
    assert 3 <= state["tokens"] - before < 1000  # of the 4 x 1000 it asked for

    # the same without streaming: the request is sent, the connection closed before any answer
    payload = json.dumps(body).encode()
    host, port = server.url.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(payload)).encode()
                     + b"\r\n\r\n" + payload)
        deadline = time.time() + 60
        while health(server)["tokens"] == state["tokens"] and time.time() < deadline:
            time.sleep(0.01)  # generating
    after = drained(server)
    assert 0 < after["tokens"] - state["tokens"] < 1000
    r = post(server, C, dict(model="tiny", prompt="O", max_tokens=3))
    assert r.status_code == 200 and health(server)["tokens"] - after["tokens"] == 3


def test_chat_templates_of_hf_folders(tmp_path):
    import chat
    from tokenizers import Tokenizer, models

    from configurator import UserError
    from tokenizer import FileTokenizer, GPT2Tokenizer
    gpt2 = GPT2Tokenizer()
    folder = tmp_path / "hf"
    folder.mkdir()
    assert chat.load(str(folder)) is None and chat.end_of_turn_ids(str(folder), gpt2) == {50256}
    template = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}"
                "{% endif %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}<assistant>")
    config = dict(chat_template=[dict(name="tools", template="x"), dict(name="default", template=template)],
                  bos_token=dict(content="<|endoftext|>"), eos_token="<|endoftext|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps(dict(eos_token_id=[50256, 198])))
    t = chat.load(str(folder))
    text = t.render([dict(role="user", content="Hi")])
    assert text == "<|endoftext|><user>Hi<|endoftext|><assistant>"
    assert gpt2.encode_special(text) == [50256, 27, 7220, 29, 17250, 50256, 27, 562, 10167, 29]
    assert chat.end_of_turn_ids(str(folder), gpt2) == {50256, 198}
    with pytest.raises(chat.TemplateRefused, match="no tools"):
        t.render([dict(role="tool", content="x")])

    # a template in chat_template.jinja, special tokens of a tokenizer.json read as such
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(eos_token="<|im_end|>")))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}")
    bpe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate("<|>_aeimnd ")}, merges=[]))
    bpe.add_special_tokens(["<|im_end|>"])
    tok = FileTokenizer(bpe.to_str())
    text = chat.load(str(folder)).render([dict(role="user", content="a")])
    assert tok.encode_special(text) == [4, 11] and len(tok.encode(text)) == 11
    assert chat.end_of_turn_ids(str(folder), tok) == {11}  # generation_config.json's 198 is no id here
    (tmp_path / "broken.jinja").write_text("{% for %}")
    with pytest.raises(UserError, match="broken.jinja: not a jinja2 template"):
        chat.load(str(folder), str(tmp_path / "broken.jinja"))
