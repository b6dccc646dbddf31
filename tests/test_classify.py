"""classify.py: the head reads the last real token, fine-tuning learns a task the untrained
backbone's features cannot, results agree with the saved predictions, bad data is a clear error."""
import csv
import json
import os
import random

import numpy as np
import pytest
import torch

import checkpoint
import classify
import labelled_text
from conftest import run_script
from configurator import UserError
from evaluation import evaluate_model
from model import GPT, GPTConfig
from tokenizer import get_tokenizer

# no word but the keyword holds a "b": spotting the keyword means attending to one character,
# which an untrained backbone's last position does not do but a fine-tuned one learns
WORDS = ("the a of and to in is it you that he was for on are with as his they at one have this "
         "from or had not what all were we when your can said there use an each which she do how").split()


def sentences(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        if i % 2 == 0:
            words.insert(rng.randrange(len(words) + 1), "banana")
        rows.append((" ".join(words), "yes" if i % 2 == 0 else "no"))
    return rows


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def write_jsonl(path, objects):
    with open(path, "w") as f:
        f.writelines((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects)
    return str(path)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A 1000-row CSV with string labels and an untrained tiny GPT whose char vocab covers it."""
    d = tmp_path_factory.mktemp("classify")
    rows = sentences(1000)
    chars = "".join(sorted(set("".join(t for t, _ in rows))))
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=96, vocab_size=len(chars))
    model = GPT(config)
    tokenizer = dict(tokenizer="char", vocab_size=len(chars), chars=chars)
    checkpoint.save(dict(model=model.state_dict(), model_args=config.to_dict(), tokenizer=tokenizer,
                         config={}, step=0), str(d / "tiny"), 0)
    return dict(dir=d, csv=write_csv(d / "banana.csv", rows), ckpt=str(d / "tiny"), rows=rows,
                cache=str(d / "cache"), results=str(d / "results"), tokenizer=tokenizer)


RECIPE = ["learning_rate=3e-3", "epochs=6", "batch_size=16"]


def classify_args(task, *extra):
    return [f"cache_dir={task['cache']}", f"results_dir={task['results']}", *RECIPE, *extra]


@pytest.fixture(scope="module")
def finetuned(task):
    p = run_script("classify.py", f"model={task['ckpt']}", f"data={task['csv']}", *classify_args(task))
    runs = os.listdir(os.path.join(task["results"], "tiny"))
    assert len(runs) == 1
    return p, os.path.join(task["results"], "tiny", runs[0])


def test_finetuning_beats_head_only_baseline(finetuned):
    p, out = finetuned
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    assert m["n_test"] == 100 and m["n_train"] == 900  # the 90/10 split
    assert m["finetuned"]["accuracy"] >= 0.95
    assert m["baseline"]["accuracy"] < m["finetuned"]["accuracy"]
    assert m["baseline"]["accuracy"] < 0.9  # the untrained features really miss the keyword
    assert "| fine-tuned |" in p.stdout and "| baseline (head only) |" in p.stdout
    # the frozen first epoch is the baseline's first epoch exactly: same head, order and features
    assert m["finetuned"]["train_loss"][0] == m["baseline"]["train_loss"][0]


def test_results_agree_with_saved_predictions(finetuned):
    _, out = finetuned
    assert sorted(os.listdir(out)) == ["config.json", "confusion.png", "metrics.json", "predictions.csv"]
    with open(os.path.join(out, "confusion.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["labels"] == {"no": 0, "yes": 1}  # string labels numbered in sorted order
    assert config["learning_rate"] == 3e-3 and config["freeze_backbone_epochs"] == 1
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)
    with open(os.path.join(out, "predictions.csv")) as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == m["n_test"]
    for run_name in ("finetuned", "baseline"):
        y = [int(r["label"]) for r in preds]
        p = [int(r[run_name]) for r in preds]
        f1s = []
        for c in sorted(set(y) | set(p)):
            tp = sum(a == c and b == c for a, b in zip(y, p))
            fp = sum(a != c and b == c for a, b in zip(y, p))
            fn = sum(a == c and b != c for a, b in zip(y, p))
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        assert m[run_name]["accuracy"] == pytest.approx(np.mean(np.array(y) == np.array(p)))
        assert m[run_name]["macro_f1"] == pytest.approx(np.mean(f1s))
        assert np.sum(m[run_name]["confusion"]) == len(y)


def test_head_reads_the_last_real_token():
    torch.manual_seed(0)
    clf = classify.GPTClassifier(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=20)),
                                 3, pad_id=0).eval()
    row = torch.tensor([[5, 6, 7, 8, 9]])
    padded = torch.tensor([[5, 6, 7, 8, 9, 0, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4]])
    with torch.no_grad():
        alone = clf(row)[0]
        given = clf(padded, torch.tensor([5, 8]))
        computed = clf(padded)
        other_last = clf(torch.tensor([[5, 6, 7, 8, 3, 0, 0, 0]]), torch.tensor([5]))[0]
    torch.testing.assert_close(given[0], alone)
    torch.testing.assert_close(computed, given)
    assert not torch.allclose(other_last, alone)  # the last real token's state, not an earlier one


def test_head_only_epochs_leave_the_backbone_untouched(task):
    tok = get_tokenizer("char", task["tokenizer"]["chars"])
    ids = [tok.encode(t) for t, _ in task["rows"][:64]]
    data = labelled_text.TextSet(np.concatenate(ids).astype(np.int32), np.array([len(i) for i in ids], np.int32),
                            np.array([int(y == "yes") for _, y in task["rows"][:64]]))
    cfg = dict(classify.DEFAULTS, epochs=2, batch_size=16, learning_rate=1e-3, device="cpu", dtype="float32")
    rt = classify.Runtime(cfg)
    for frozen_epochs, changes in ((2, False), (1, True)):
        backbone, _, _ = checkpoint.load_model(task["ckpt"])
        before = {k: v.clone() for k, v in backbone.state_dict().items()}
        clf = classify.GPTClassifier(backbone, 2)
        head_before = clf.head.weight.clone()
        feats, _ = classify.last_hidden(clf, data, 16, rt)
        classify.train_classifier(clf, data, cfg, rt, frozen_epochs, feats)
        same = all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
        assert same != changes
        assert not torch.equal(head_before, clf.head.weight)


def test_scores_macro_f1_over_present_classes():
    m = classify.scores(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), 4)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # class 0: P 1/2 R 1/2 -> 1/2; class 1: P 2/3 R 2/3 -> 2/3; classes 2 and 3 absent: not averaged
    assert m["macro_f1"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["confusion"][0] == [1, 1, 0, 0] and m["confusion"][1] == [1, 2, 0, 0]


def test_tokenised_once_and_cached(task, tmp_path, monkeypatch):
    tok = get_tokenizer("char", task["tokenizer"]["chars"])
    cfg = dict(classify.DEFAULTS, cache_dir=str(tmp_path))
    spec = dict(train=task["csv"], test="")
    train, test, names, path = labelled_text.load_data("banana", spec, tok, task["tokenizer"], 32, cfg)
    assert os.path.basename(path).startswith("banana-char-") and path.endswith(".npz")
    assert names == ["no", "yes"] and len(train) + len(test) == 1000 and train.lengths.max() == 32

    def no_reading(path):
        raise AssertionError("the cache should have been used")
    monkeypatch.setattr(labelled_text, "read_rows", no_reading)
    again = labelled_text.load_data("banana", spec, tok, task["tokenizer"], 32, cfg)
    assert again[3] == path and np.array_equal(again[0].ids, train.ids)
    with pytest.raises(AssertionError):  # another max_len is another cache entry
        labelled_text.load_data("banana", spec, tok, task["tokenizer"], 16, cfg)


def error_of(task, *args):
    p = run_script("classify.py", f"model={task['ckpt']}", *classify_args(task, *args), check=False,
                   env=dict(HF_DATASETS_OFFLINE="1"))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def test_bad_csv_row_names_its_line(task):
    rows = task["rows"][:20] + [("an apple a day", "")] + task["rows"][20:40]
    path = write_csv(task["dir"] / "missing_label.csv", rows)
    assert "missing_label.csv:22: empty label" in error_of(task, f"data={path}")


def test_bad_jsonl_row_names_its_line(task):
    good = [dict(text=t, label=y) for t, y in task["rows"][:10]]
    path = write_jsonl(task["dir"] / "broken.jsonl", good[:4] + ['{"text": "a cat", "label": '] + good[4:])
    assert "broken.jsonl:5: not JSON" in error_of(task, f"train_file={path}")


def test_unknown_test_label_names_its_line(task):
    train = write_csv(task["dir"] / "train.csv", task["rows"][:50])
    test = write_jsonl(task["dir"] / "test.jsonl", [dict(text=t, label=y) for t, y in task["rows"][50:52]]
                       + [dict(text="the cat", label="maybe")])
    msg = error_of(task, f"train_file={train}", f"test_file={test}")
    assert "test.jsonl:3" in msg and "'maybe'" in msg and "no, yes" in msg


@pytest.mark.parametrize("content, expected", [
    ("label,words\n1,hi\n", "the header needs columns text and label"),
    ("text,label\n\"\",1\n", "x.csv:2: empty text"),
    ("text,label\nhi\n", "x.csv:2: missing label"),
    ('{"text": "hi", "label": 1.5}\n', "label must be an int or a string"),
    ('{"text": "hi", "label": 0}\n\n{"label": 1}\n', "x.jsonl:3: missing text"),
    ('["hi", 1]\n', "x.jsonl:1: not a JSON object"),
])
def test_read_rows_rejects_bad_rows(tmp_path, content, expected):
    path = tmp_path / ("x.jsonl" if content.startswith(("{", "[")) else "x.csv")
    path.write_text(content)
    with pytest.raises(UserError, match=expected):
        labelled_text.read_rows(str(path))


def test_int_labels_sort_numerically(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [dict(text="a", label=10), dict(text="b", label="2"),
                                              dict(text="c", label=1)])
    assert labelled_text.sorted_labels([y for _, _, y in labelled_text.read_rows(path)]) == ["1", "2", "10"]


def test_hf_dataset_offline_names_the_local_alternative(task):
    msg = error_of(task, "data=imdb")
    assert "train_file=" in msg


def test_compare_table(task, tmp_path):
    text_path = tmp_path / "wiki.txt"
    text_path.write_text(" ".join(t for t, _ in task["rows"][:100]))
    small = write_csv(tmp_path / "small.csv", task["rows"][:200])
    p = run_script("classify.py", f"compare=first={task['ckpt']},second={task['ckpt']}",
                   f"data={small}", f"wikitext_file={text_path}", f"cache_dir={task['cache']}",
                   f"results_dir={tmp_path / 'results'}", "epochs=1", "batch_size=32", "baseline=False")
    (root,) = os.listdir(tmp_path / "results" / "compare")
    with open(tmp_path / "results" / "compare" / root / "compare.json") as f:
        rows = json.load(f)["results"]
    assert list(rows) == ["first", "second"]
    model, tok_info, _ = checkpoint.load_model(task["ckpt"])
    tokens = np.array(get_tokenizer("char", tok_info["chars"]).encode(text_path.read_text()))
    ppl = evaluate_model(model, tokens, 96, 96, 32, "cpu")["ppl"]
    for name, r in rows.items():
        assert r["wikitext_ppl"] == pytest.approx(ppl, rel=1e-5)
        assert 0 <= r["small"]["finetuned"]["accuracy"] <= 1 and "baseline" not in r["small"]
        assert r["params"] == model.num_params() and r["tok_s"] > 0
        assert f"| {name} | " in p.stdout
    assert "small acc" in p.stdout and "WikiText PPL" in p.stdout


def save_dataset(folder, splits, names=None):
    """A DatasetDict of text/label splits written by save_to_disk; labels are ClassLabel ids when
    names are given (as imdb and ag_news have them), else plain values."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    features = Features(text=Value("string"), label=ClassLabel(names=names)) if names else None
    columns = {s: dict(text=[t for t, _ in rows], label=[y for _, y in rows]) for s, rows in splits.items()}
    DatasetDict({s: Dataset.from_dict(c, features=features) for s, c in columns.items()}).save_to_disk(str(folder))
    return str(folder)


def test_saved_dataset_read_tokenised_and_cached(task, tmp_path):
    rows = task["rows"][:60]
    # ClassLabel order, not sorted order, numbers the classes: "yes" is 0 here
    ids = [(t, 0 if y == "yes" else 1) for t, y in rows]
    folder = save_dataset(tmp_path / "banana_ds", dict(train=ids[:40], test=ids[40:]), names=["yes", "no"])
    tok = get_tokenizer("char", task["tokenizer"]["chars"])
    cfg = dict(classify.DEFAULTS, cache_dir=str(tmp_path / "cache"), data=folder)
    ((name, spec),) = labelled_text.dataset_specs(cfg)
    assert (name, spec) == ("banana_ds", dict(hf=folder))
    train, test, names, path = labelled_text.load_data(name, spec, tok, task["tokenizer"], 96, cfg)
    assert names == ["yes", "no"] and (len(train), len(test)) == (40, 20)
    for data, part in ((train, ids[:40]), (test, ids[40:])):
        texts = [tok.decode(data.ids[data.offsets[i]:data.offsets[i + 1]].tolist()) for i in range(len(data))]
        assert texts == [t for t, _ in part] and data.labels.tolist() == [y for _, y in part]
    # another dataset in the same folder is another cache entry
    save_dataset(folder, dict(train=ids[:30], test=ids[30:]), names=["yes", "no"])
    again = labelled_text.load_data(name, spec, tok, task["tokenizer"], 96, cfg)
    assert again[3] != path and len(again[0]) == 30


def test_saved_dataset_plain_labels_and_bad_rows(tmp_path):
    rows = [("a good film", "pos"), ("a bad film", "neg"), ("fine", "pos")]
    folder = save_dataset(tmp_path / "plain", dict(train=rows, test=rows[:1]))
    train, test, names = labelled_text.hf_rows(folder)
    assert names is None and train == [(1, "a good film", "pos"), (2, "a bad film", "neg"), (3, "fine", "pos")]
    save_dataset(tmp_path / "unlabelled", dict(train=[("x", 0), ("y", 1)], test=[("z", -1)]), names=["a", "b"])
    with pytest.raises(UserError, match="unlabelled test row 1: label -1 is none of the dataset's 2 classes"):
        labelled_text.hf_rows(str(tmp_path / "unlabelled"))
    save_dataset(tmp_path / "blank", dict(train=[("x", "a"), ("  ", "b")], test=[("z", "a")]))
    with pytest.raises(UserError, match="blank train row 2: empty text"):
        labelled_text.hf_rows(str(tmp_path / "blank"))


def test_cli_on_a_saved_dataset(task, tmp_path):
    ids = [(t, int(y == "yes")) for t, y in task["rows"][:80]]
    folder = save_dataset(tmp_path / "ds", dict(train=ids[:60], test=ids[60:]), names=["no", "yes"])
    run_script("classify.py", f"model={task['ckpt']}", f"data={folder}", f"cache_dir={tmp_path / 'cache'}",
               f"results_dir={tmp_path / 'results'}", "epochs=1", "batch_size=16", "baseline=False")
    (run,) = os.listdir(tmp_path / "results" / "tiny")
    with open(tmp_path / "results" / "tiny" / run / "metrics.json") as f:
        m = json.load(f)
    assert (m["data"], m["n_train"], m["n_test"], m["labels"]) == ("ds", 60, 20, ["no", "yes"])
    assert np.sum(m["finetuned"]["confusion"]) == 20 and "baseline" not in m
