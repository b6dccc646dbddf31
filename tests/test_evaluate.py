"""evaluate.py: every token scored once, equal to a per-position brute force, and the CLI on our
checkpoints, HF folders and text files."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_model
from conftest import make_char_dataset, run_script
from data import BinDataset
from evaluation import Calibration, evaluate_model, evaluate_models, wikitext_text
from model import GPT, GPTConfig

V = 40
TOKENS = np.random.default_rng(0).integers(0, V, size=203)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=V)).eval()


def reference_log_probs(logits_of, tokens, context, stride):
    """Per-target float64 log-probabilities straight from the definition, one forward pass per
    target: windows of `context` tokens start at 0, stride, 2*stride, ... (the last moved back to
    end at the text's end) and each target is scored by the first window holding it, from that
    window's start. Returns (rows (n, V), history of each target)."""
    n = len(tokens) - 1
    T = min(context, n)
    rows, history = [], []
    for t in range(n):  # target tokens[t + 1], predicted after tokens[s..t]
        k = 0
        while min(k * stride, n - T) + T <= t:
            k += 1
        s = min(k * stride, n - T)
        with torch.no_grad():
            logits = logits_of(torch.tensor(np.asarray(tokens[s:t + 1], dtype=np.int64))[None])
        rows.append(F.log_softmax(logits[0, -1].double(), -1))
        history.append(t - s)
    return torch.stack(rows), np.array(history)


def reference_nll(logits_of, tokens, context, stride):
    rows, history = reference_log_probs(logits_of, tokens, context, stride)
    targets = torch.as_tensor(np.asarray(tokens[1:], dtype=np.int64))
    return -rows.gather(1, targets[:, None])[:, 0].numpy(), history


def ours(model, vocab_size):
    return lambda x: model(x)[0][..., :vocab_size]


@pytest.mark.parametrize("stride", [1, 3, 8, 15, 16])
def test_sliding_window_equals_per_position_brute_force(tiny, stride):
    r = evaluate_model(tiny, TOKENS, 16, stride, 5, "cpu")
    ref, history = reference_nll(ours(tiny, V), TOKENS, 16, stride)
    assert r["tokens"] == len(TOKENS) - 1  # every target once
    assert abs(r["loss"] - ref.mean()) < 1e-5
    assert abs(r["ppl"] - np.exp(ref.mean())) < 1e-3 * r["ppl"]
    # the definition's guarantee, checked on the reference itself
    assert (history[:16] == np.arange(16)).all() and (history[16:] >= 16 - stride).all()


def test_stride_equal_to_context_is_non_overlapping(tiny):
    a = evaluate_model(tiny, TOKENS, 16, 16, 4, "cpu")
    assert evaluate_model(tiny, TOKENS, 16, 0, 3, "cpu")["loss"] == pytest.approx(a["loss"], abs=1e-6)
    assert evaluate_model(tiny, TOKENS, 0, 0, 4, "cpu")["block_size"] == 16  # 0 = the model's own
    # independent reference: consecutive chunks of 16 targets, each scored from its chunk's start
    head = (len(TOKENS) - 1) // 16 * 16
    nll = []
    for s in range(0, head, 16):
        with torch.no_grad():
            logits = tiny(torch.tensor(TOKENS[s:s + 16])[None])[0][0, :, :V]
        nll += F.cross_entropy(logits, torch.tensor(TOKENS[s + 1:s + 17]), reduction="none").tolist()
    b = evaluate_model(tiny, TOKENS[:head + 1], 16, 16, 4, "cpu")
    assert b["tokens"] == head and abs(b["loss"] - np.mean(nll)) < 1e-6
    assert a["loss"] != b["loss"]  # the tail beyond the last full chunk is scored too


def test_progress_bar_leaves_the_loss_alone(tiny, monkeypatch):
    import tqdm
    monkeypatch.setattr(tqdm.tqdm, "update", lambda self, n=1: True)  # as when the bar redraws
    a = evaluate_model(tiny, TOKENS, 16, 4, 8, "cpu", progress=True)
    b = evaluate_model(tiny, TOKENS, 16, 4, 8, "cpu")
    assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) < 1e-6
    assert not tiny._forward_pre_hooks  # removed again


def test_text_shorter_than_context(tiny):
    r = evaluate_model(tiny, TOKENS[:6], 16, 8, 4, "cpu")
    ref, _ = reference_nll(ours(tiny, V), TOKENS[:6], 16, 8)
    assert r["tokens"] == 5 and abs(r["loss"] - ref.mean()) < 1e-5


def test_whole_masked_split_equals_brute_force_sum(tmp_path):
    text = "".join(np.random.default_rng(1).choice(list("abcdefgh \n"), size=700))
    folder = make_char_dataset(str(tmp_path / "d"), text, val_fraction=0.3)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        n = meta[f"{split}_tokens"]
        rng.integers(0, 2, size=n).astype(np.uint8).tofile(tmp_path / "d" / f"{split}.mask.bin")
    (tmp_path / "d" / "meta.json").write_text(json.dumps(dict(meta, has_mask=True)))
    data = BinDataset(folder)
    torch.manual_seed(1)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=data.vocab_size)).eval()
    r = evaluate_model(model, data, 16, 0, 4, "cpu", split="val")
    tokens, mask = np.asarray(data.tokens["val"]), np.asarray(data.masks["val"])
    nll, _ = reference_nll(ours(model, data.vocab_size), tokens, 16, 16)
    scored = mask[1:] == 1  # targets whose mask is 0 (e.g. prompts) are not scored
    assert r["tokens"] == scored.sum() and abs(r["loss"] - nll[scored].sum() / scored.sum()) < 1e-5


def test_cli_on_our_checkpoint(tmp_path, char_data):
    run_script("train.py", f"dataset={char_data}", f"out_dir={tmp_path / 'ours'}", "n_layer=1", "n_head=2",
               "n_embd=32", "block_size=32", "batch_size=4", "max_iters=3", "eval_iters=1")
    p = run_script("evaluate.py", f"models=mine={tmp_path / 'ours'},again={tmp_path / 'ours'}",
                   f"dataset={char_data}", "stride=24", "batch_size=16", f"out={tmp_path / 'e.json'}")
    saved = json.loads((tmp_path / "e.json").read_text())
    res = saved["results"]
    assert list(res) == ["mine", "again"] and saved["config"]["stride"] == 24
    assert set(res["mine"]) == {"source", "params", "loss", "ppl", "tokens", "tok_s", "block_size", "stride",
                                "ece", "accuracy", "calibration"}
    model, _, _ = load_model(str(tmp_path / "ours"))
    direct = evaluate_model(model, BinDataset(char_data), 32, 24, 7, "cpu")
    val = np.fromfile(f"{char_data}/val.bin", dtype=np.uint16)
    for r in res.values():
        assert r["tokens"] == len(val) - 1 and (r["block_size"], r["stride"]) == (32, 24)
        assert abs(r["loss"] - direct["loss"]) < 1e-5 and r["params"] == model.num_params() and r["tok_s"] > 0
    assert "| mine |" in p.stdout and "| again |" in p.stdout and "| model | params | loss | PPL |" in p.stdout
    assert "batch" in p.stderr  # the progress bar


def test_cli_on_hf_folder_and_text_file(tmp_path, char_data):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64))
    hf.save_pretrained(tmp_path / "hf")
    text = "It was the best of times, it was the worst of times. " * 12
    (tmp_path / "t.txt").write_text(text)
    run_script("evaluate.py", f"models={tmp_path / 'hf'}", f"text={tmp_path / 't.txt'}", "stride=40",
               f"out={tmp_path / 'h.json'}")
    r = json.loads((tmp_path / "h.json").read_text())["results"]["hf"]
    from tokenizer import get_tokenizer
    tokens = get_tokenizer("gpt2").encode(text)
    assert r["tokens"] == len(tokens) - 1 and r["stride"] == 40 and r["block_size"] == 64
    # the converted model through our windows equals transformers' own model, position by position
    nll, _ = reference_nll(lambda x: hf.eval()(x).logits, np.array(tokens), 64, 40)
    assert abs(r["loss"] - nll.mean()) < 1e-4
    run_script("evaluate.py", f"models={tmp_path / 'hf'}", f"text={tmp_path / 't.txt'}",
                   f"out={tmp_path / 'd.json'}")
    assert json.loads((tmp_path / "d.json").read_text())["results"]["hf"]["stride"] == 64  # min(512, context)
    p = run_script("evaluate.py", f"models={tmp_path / 'hf'}", f"dataset={char_data}", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "uses the gpt2 tokenizer" in p.stderr and "uses the char tokenizer" in p.stderr


def test_char_checkpoint_on_other_characters_refused(tmp_path, char_data):
    torch.manual_seed(0)
    chars = json.loads(open(f"{char_data}/meta.json").read())["chars"]
    other = make_char_dataset(str(tmp_path / "other"), (chars[:-1] + "\u263a") * 30)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=len(chars)))
    from checkpoint import save
    save(dict(model=model.state_dict(), model_args=model.config.to_dict(), config={}, step=0,
              tokenizer=BinDataset(char_data).tokenizer), str(tmp_path / "ck"), 0, 1, False)
    p = run_script("evaluate.py", f"models={tmp_path / 'ck'}", f"dataset={other}", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "different characters" in p.stderr


def test_wikitext_offline_points_to_text():
    p = run_script("evaluate.py", "models=gpt2", "wikitext=wikitext-2-raw-v1", check=False,
                   env=dict(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "text=" in p.stderr


def test_wikitext_from_a_local_copy_scores_the_raw_file(tmp_path):
    """A saved copy of the dataset (rows: the raw file's lines, blank lines emptied, as the hub
    gives them) is scored token for token as the raw test file itself."""
    from datasets import Dataset, DatasetDict
    raw = " \n = Title = \n \n Body text . \n \n = = Part = = \n \n More text , here . \n \n"
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    DatasetDict(test=Dataset.from_dict({"text": rows})).save_to_disk(str(tmp_path / "wt"))
    assert wikitext_text(str(tmp_path / "wt")) == raw
    chars = "".join(sorted(set(raw)))
    model = save_char_model(tmp_path / "ck", chars, 16, 1, 0)
    run_script("evaluate.py", f"models={tmp_path / 'ck'}", f"wikitext={tmp_path / 'wt'}", f"out={tmp_path / 'e.json'}")
    r = json.loads((tmp_path / "e.json").read_text())["results"]["ck"]
    direct = evaluate_model(model, np.array([chars.index(c) for c in raw]), 16, 16, 8, "cpu")
    assert r["tokens"] == len(raw) - 1 and abs(r["loss"] - direct["loss"]) < 1e-5


@pytest.mark.parametrize("args, message", [
    (["models=a=x,a=y", "text=t"], "same name"),
    (["models=gpt2"], "exactly one of"),
    (["models=gpt2", "text=nope.txt"], "not found"),
])
def test_user_errors(args, message):
    p = run_script("evaluate.py", *args, check=False)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- teacher/student agreement, calibration


def brute_ece(confidence, correct, bins):
    """ECE from its definition, one bin at a time: bin k holds confidences in (k/M, (k+1)/M]."""
    total, n = 0.0, len(confidence)
    for k in range(bins):
        inside = [i for i, c in enumerate(confidence) if k / bins < c <= (k + 1) / bins]
        if inside:
            acc = sum(correct[i] for i in inside) / len(inside)
            conf = sum(confidence[i] for i in inside) / len(inside)
            total += len(inside) / n * abs(acc - conf)
    return total


def test_ece_of_a_hand_built_case():
    cal = Calibration(bins=5)  # bins (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]
    conf = torch.tensor([0.9, 0.9, 0.95, 0.3, 0.35, 0.4, 0.1], dtype=torch.float64)
    correct = torch.tensor([1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
    cal.add(conf[:4], correct[:4])  # two calls accumulate as one
    cal.add(conf[4:], correct[4:])
    # by hand: |2 - 2.75| + |2 - 1.05| + |0 - 0.1| over 7 tokens (0.4 is in the bin it closes)
    assert cal.ece() == pytest.approx(1.8 / 7, abs=1e-12)
    assert cal.accuracy() == pytest.approx(4 / 7, abs=1e-12)
    table = cal.table()
    assert [b["tokens"] for b in table] == [1, 3, 0, 0, 3] and table[2]["accuracy"] is None
    assert table[1]["confidence"] == pytest.approx(0.35) and table[4]["accuracy"] == pytest.approx(2 / 3)
    assert table[4]["upper"] == 1.0


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(1)
    teacher = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=V)).eval()
    student = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=V)).eval()
    with torch.no_grad():  # sharper than at init, so confidences spread over several bins
        teacher.lm_head.weight.mul_(40)
        student.lm_head.weight.mul_(25)
    return teacher, student


@pytest.mark.parametrize("stride", [5, 16])
def test_kl_agreement_and_ece_equal_float64_brute_force(pair, stride):
    teacher, student = pair
    r = evaluate_models(dict(teacher=teacher, student=student), TOKENS, 16, stride, 3, "cpu",
                        reference="teacher")
    lt, _ = reference_log_probs(ours(teacher, V), TOKENS, 16, stride)
    ls, _ = reference_log_probs(ours(student, V), TOKENS, 16, stride)
    y = torch.as_tensor(TOKENS[1:], dtype=torch.int64)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    assert r["student"]["tokens"] == r["teacher"]["tokens"] == len(TOKENS) - 1
    assert abs(r["student"]["kl"] - kl.mean().item()) < 1e-5 and kl.mean() > 0.1
    agree = (lt.argmax(-1) == ls.argmax(-1)).double().mean().item()
    assert r["student"]["agreement"] == pytest.approx(agree, abs=1e-12) and 0 < agree < 1
    assert "kl" not in r["teacher"] and "agreement" not in r["teacher"]
    for name, rows in (("teacher", lt), ("student", ls)):
        conf, top = rows.exp().max(-1)
        ece = brute_ece(conf.tolist(), (top == y).tolist(), 15)
        assert abs(r[name]["ece"] - ece) < 1e-5 and ece > 0.01
        assert r[name]["accuracy"] == pytest.approx((top == y).double().mean().item(), abs=1e-12)
        assert abs(r[name]["loss"] + rows.gather(1, y[:, None]).mean().item()) < 1e-5
        assert sum(b["tokens"] for b in r[name]["calibration"]) == len(y)
    occupied = sum(b["tokens"] > 0 for b in r["student"]["calibration"])
    assert occupied >= 3  # the binning is exercised, not one bin holding everything


def test_a_model_against_itself(pair):
    teacher, _ = pair
    r = evaluate_models(dict(a=teacher, b=teacher), TOKENS, 16, 8, 4, "cpu", reference="a")
    assert abs(r["b"]["kl"]) < 1e-6 and r["b"]["agreement"] == 1.0
    assert r["a"]["ece"] == r["b"]["ece"] and r["a"]["loss"] == r["b"]["loss"]


def test_rows_are_chunked(pair, monkeypatch):
    # at a vocab of 40 one chunk holds every row: force several chunks, same numbers
    import evaluation
    teacher, student = pair
    whole = evaluate_models(dict(t=teacher, s=student), TOKENS, 16, 16, 8, "cpu", reference="t")
    monkeypatch.setattr(evaluation, "default_chunk_rows", lambda vocab_size: 7)
    chunked = evaluate_models(dict(t=teacher, s=student), TOKENS, 16, 16, 8, "cpu", reference="t")
    for key in ("loss", "kl", "agreement", "ece"):
        assert chunked["s"][key] == pytest.approx(whole["s"][key], abs=1e-6)
    for a, b in zip(chunked["s"]["calibration"], whole["s"]["calibration"]):
        assert a["tokens"] == b["tokens"] and a["accuracy"] == b["accuracy"]
        assert a["confidence"] == b["confidence"] or abs(a["confidence"] - b["confidence"]) < 1e-6


def save_char_model(folder, chars, block_size, n_layer, seed):
    from checkpoint import save
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=16, block_size=block_size, vocab_size=len(chars)))
    save(dict(model=model.state_dict(), model_args=model.config.to_dict(), config={}, step=0,
              tokenizer=dict(tokenizer="char", vocab_size=len(chars), chars=chars)), str(folder), 0, 1)
    return model.eval()


def test_cli_teacher_table_and_json(tmp_path, char_data):
    chars = json.loads(open(f"{char_data}/meta.json").read())["chars"]
    teacher = save_char_model(tmp_path / "t", chars, 32, 2, 0)
    student = save_char_model(tmp_path / "s", chars, 16, 1, 1)
    p = run_script("evaluate.py", f"models=teacher={tmp_path / 't'},student={tmp_path / 's'}",
                   f"dataset={char_data}", "teacher=teacher", "batch_size=16", f"out={tmp_path / 'e.json'}")
    saved = json.loads((tmp_path / "e.json").read_text())
    res = saved["results"]
    assert list(res) == ["teacher", "student"] and saved["config"]["teacher"] == "teacher"
    # the pair runs over the student's 16-token windows, and says so; the teacher's own row over its 32
    assert "compared over windows of 16 tokens" in p.stdout
    assert (res["student"]["block_size"], res["teacher"]["block_size"]) == (16, 32)
    direct = evaluate_models(dict(teacher=teacher, student=student), BinDataset(char_data), 16, 0, 5,
                             "cpu", reference="teacher")["student"]
    for key in ("loss", "kl", "agreement", "ece", "accuracy"):
        assert abs(res["student"][key] - direct[key]) < 1e-5, key
    assert len(res["student"]["calibration"]) == 15 and "kl" not in res["teacher"]
    alone = evaluate_models(dict(teacher=teacher), BinDataset(char_data), 32, 0, 5, "cpu")["teacher"]
    assert abs(res["teacher"]["ece"] - alone["ece"]) < 1e-6
    assert "| model | params | loss | PPL | ECE | KL from teacher | top-1 agreement |" in p.stdout
    row = next(line for line in p.stdout.splitlines() if line.startswith("| student |"))
    assert f"{direct['kl']:.4f}" in row and f"{direct['agreement']:.2%}" in row
    assert next(line for line in p.stdout.splitlines() if line.startswith("| teacher |")).count("| - |") == 1


def test_cli_teacher_errors(tmp_path, char_data):
    chars = json.loads(open(f"{char_data}/meta.json").read())["chars"]
    save_char_model(tmp_path / "t", chars, 16, 1, 0)
    save_char_model(tmp_path / "o", chars[:-1] + "\u263a", 16, 1, 0)  # another tokenizer
    (tmp_path / "x.txt").write_text("some text " * 20)
    models = f"models=t={tmp_path / 't'},o={tmp_path / 'o'}"
    p = run_script("evaluate.py", models, f"text={tmp_path / 'x.txt'}", "teacher=nobody", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "teacher=nobody names none of models= (t, o)" in p.stderr
    p = run_script("evaluate.py", models, f"text={tmp_path / 'x.txt'}", "teacher=t",
                   f"out={tmp_path / 'no.json'}", check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "teacher t" in p.stderr and "share one tokenizer" in p.stderr
    assert not (tmp_path / "no.json").exists()
