"""sample.py: samples from a real checkpoint, greedy equal to the engine's continuation of each
prompt alone, teacher JSONL with kept fields, text independent of batch_size, a killed run that
resumes into the very same file, and one-line errors for bad input."""
import json
import os
import sys

import pytest
import torch

import checkpoint
import engine
import sample
from configurator import run
from conftest import ROOT, kill_at_lines, run_script
from model import GPT, GPTConfig
from tokenizer import get_tokenizer

DASHES = "-" * 40


@pytest.fixture(scope="module")
def eot_ckpt(tmp_path_factory):
    """A GPT-2-vocab model that always says <|endoftext|>: ln_f's output is a constant vector that
    only the eot embedding row is aligned with."""
    folder = tmp_path_factory.mktemp("eot")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=50257))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[50256] = 1.0
    checkpoint.save(dict(model=model.state_dict(), model_args=model.config.to_dict(), config={}, step=0,
                         best_val_loss=float("inf"), tokenizer=dict(tokenizer="gpt2", vocab_size=50257)),
                    str(folder), step=0, keep_last=1)
    return str(folder)


def samples(stdout):
    parts = stdout.split(DASHES + "\n")
    assert parts[-1] == ""
    return [p[:-1] for p in parts[:-1]]  # each sample is printed with its own newline


def greedy_reference(source, prompt, n):
    model, info, _ = checkpoint.load_model(source)
    tok = get_tokenizer(info["tokenizer"], info.get("chars"))
    return tok.decode(engine.generate(model, [tok.encode(prompt)], n, temperature=0)[0].tokens)


def test_start_prints_num_samples_and_greedy_is_the_models_continuation(char_ckpt, tmp_path):
    p = run_script("sample.py", f"source={char_ckpt}", "start=ROMEO:", "num_samples=3", "max_new_tokens=40",
                   "batch_size=2")
    got = samples(p.stdout)
    assert len(got) == 3 and all(s.startswith("ROMEO:") and len(s) == 46 for s in got)
    assert len(set(got)) == 3  # sampled, and different rows drew different tokens

    greedy = ["start=ROMEO:", "num_samples=2", "max_new_tokens=50", "temperature=0"]
    a = samples(run_script("sample.py", f"source={char_ckpt}", *greedy).stdout)
    b = samples(run_script("sample.py", f"source={char_ckpt}", *greedy).stdout)
    # 50 new tokens run past block_size=32, so the cache's sliding window is exercised too
    assert a == b == ["ROMEO:" + greedy_reference(char_ckpt, "ROMEO:", 50)] * 2

    (tmp_path / "start.txt").write_text("ROMEO:")
    c = samples(run_script("sample.py", f"source={char_ckpt}", *greedy[1:], f"start=FILE:{tmp_path / 'start.txt'}").stdout)
    assert c == a
    p = run_script("sample.py", f"source={char_ckpt}", f"start=FILE:{tmp_path / 'none.txt'}", check=False)
    assert p.returncode == 2 and "file not found" in p.stderr


def test_generation_stops_at_end_of_text(eot_ckpt, tmp_path):
    p = run_script("sample.py", f"source={eot_ckpt}", "start=Hello world", "num_samples=2", "max_new_tokens=20")
    assert samples(p.stdout) == ["Hello world", "Hello world"]
    (tmp_path / "p.txt").write_text("Hello\n")
    run_script("sample.py", f"source={eot_ckpt}", f"prompts={tmp_path / 'p.txt'}", f"out={tmp_path / 'o.jsonl'}",
               "num_samples=1")
    assert json.loads((tmp_path / "o.jsonl").read_text())["response"] == ""


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_txt_prompts_to_jsonl(char_ckpt, tmp_path):
    prompts = ["ROMEO:", "JULIET: O", "ROMEO:", "Hi", "Is it so?"]
    (tmp_path / "p.txt").write_text("\n".join(prompts[:2]) + "\n\n  \n" + "\n".join(prompts[2:]) + "\n")
    run_script("sample.py", f"source={char_ckpt}", f"prompts={tmp_path / 'p.txt'}", f"out={tmp_path / 'o.jsonl'}",
               "num_samples=2", "max_new_tokens=12", "temperature=0", "batch_size=3")
    recs = read_jsonl(tmp_path / "o.jsonl")
    assert sorted((r["index"], r["sample"]) for r in recs) == [(i, s) for i in range(5) for s in range(2)]
    for r in recs:
        assert list(r) == ["prompt", "response", "index", "sample"]
        assert r["prompt"] == prompts[r["index"]]
        # rows batched with prompts of other lengths give what the engine gives each prompt alone
        assert r["response"] == greedy_reference(char_ckpt, r["prompt"], 12)


def test_jsonl_keeps_fields_and_reports_broken_lines(char_ckpt, tmp_path):
    lines = [json.dumps({"prompt": "ROMEO:", "id": "a", "meta": {"n": 1}, "response": "old"}),
             "{not json",
             json.dumps({"prompt": "JULIET:", "id": "b"}),
             "",
             json.dumps({"text": "no prompt"}),
             json.dumps(["a list"])]
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(lines) + "\n")
    p = run_script("sample.py", f"source={char_ckpt}", f"prompts={src}", f"out={tmp_path / 'o.jsonl'}",
                   "num_samples=3", "max_new_tokens=8")
    assert "skipped 3 of 5 lines: line 2 (not JSON: " in p.stderr
    assert "line 5 (missing prompt), line 6 (not a JSON object (a list))" in p.stderr
    recs = read_jsonl(tmp_path / "o.jsonl")
    assert len(recs) == 6
    first = [r for r in recs if r["index"] == 0]
    assert [r["sample"] for r in first] == [0, 1, 2]
    assert list(first[0]) == ["prompt", "response", "id", "meta", "index", "sample"]
    assert first[0]["id"] == "a" and first[0]["meta"] == {"n": 1} and first[0]["response"] != "old"
    assert all(r["id"] == "b" and r["prompt"] == "JULIET:" for r in recs if r["index"] == 1)

    (tmp_path / "bad.jsonl").write_text("{oops\n[]\n")
    p = run_script("sample.py", f"source={char_ckpt}", f"prompts={tmp_path / 'bad.jsonl'}",
                   f"out={tmp_path / 'x.jsonl'}", check=False)
    assert p.returncode == 2 and "bad.jsonl:1: not JSON" in p.stderr and "line 2 (not a JSON object" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_killed_run_resumes_into_the_same_file(char_ckpt, tmp_path):
    words = ["ROMEO:", "O", "Is it so?", "Hi", "What, ho!", "Nay"]
    prompts = [" ".join(words[(i * 7 + k) % len(words)] for k in range(1 + i % 3)) for i in range(150)]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    args = [f"source={char_ckpt}", f"prompts={tmp_path / 'p.txt'}", "num_samples=2", "max_new_tokens=24",
            "batch_size=3", "seed=7"]
    full, resumed = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl"
    run_script("sample.py", *args, f"out={full}")
    expected = full.read_bytes()
    assert expected.count(b"\n") == 300

    kill_at_lines([sys.executable, os.path.join(ROOT, "sample.py"), *args, f"out={resumed}"], resumed, 20)
    partial = resumed.read_bytes()
    assert 20 <= partial.count(b"\n") < 300 and expected.startswith(partial[:partial.rfind(b"\n") + 1])
    run_script("sample.py", *args, f"out={resumed}")
    assert resumed.read_bytes() == expected

    # a write torn mid-record, as a kill during write() leaves it, is cut away and redone
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(expected[:len(expected) // 2])
    assert not torn.read_bytes().endswith(b"\n")
    p = run_script("sample.py", *args, f"out={torn}")
    assert "partial last record" in p.stderr
    assert torn.read_bytes() == expected

    # an out file written from other prompts is refused, not appended to
    (tmp_path / "other.txt").write_text("Nay\n")
    p = run_script("sample.py", *args[:1], f"prompts={tmp_path / 'other.txt'}", f"out={full}", check=False)
    assert p.returncode == 2 and "other prompts" in p.stderr
    assert full.read_bytes() == expected


def test_sampled_text_does_not_depend_on_batch_size(char_ckpt, tmp_path):
    (tmp_path / "p.txt").write_text("ROMEO:\nO\nIs it so? Nay, my lord.\nHi\n")
    args = [f"source={char_ckpt}", f"prompts={tmp_path / 'p.txt'}", "num_samples=3", "max_new_tokens=20",
            "temperature=1.0", "top_k=0", "top_p=0.95", "seed=5"]
    files = []
    for batch_size in (1, 2, 7):  # a row at a time, one prompt's samples split, several prompts
        files.append(tmp_path / f"b{batch_size}.jsonl")
        run_script("sample.py", *args, f"batch_size={batch_size}", f"out={files[-1]}")
    recs = read_jsonl(files[0])
    assert [(r["index"], r["sample"]) for r in recs] == [(i, s) for i in range(4) for s in range(3)]
    assert len({r["response"] for r in recs}) == 12
    assert all(f.read_bytes() == files[0].read_bytes() for f in files[1:])


def test_bad_input_is_one_line_and_writes_nothing(char_ckpt, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    (tmp_path / "long.txt").write_text("Hi\n" + "ROMEO: " * 5 + "\n")  # 35 characters; the context is 32
    (tmp_path / "empty.txt").write_text("\n  \n")
    cases = [([f"prompts={tmp_path / 'long.txt'}", f"out={out}"], "long.txt prompt 1 is 35 tokens, more than the "
              "model's context of 32"),
             (["start=" + "O" * 33], "start is 33 tokens, more than the model's context of 32"),
             ([f"prompts={tmp_path / 'empty.txt'}", f"out={out}"], "empty.txt holds no prompts"),
             (["max_new_tokens=0"], "max_new_tokens=0: must be >= 1")]
    for args, message in cases:
        with pytest.raises(SystemExit) as stop:
            run(sample.main, sample.DEFAULTS, sample.LIMITS, [f"source={char_ckpt}", *args])
        err = capsys.readouterr()
        assert stop.value.code == 2 and err.out == "" and "Traceback" not in err.err
        assert err.err.splitlines()[-1].startswith("error: ") and message in err.err.splitlines()[-1], err.err
        assert not out.exists()
