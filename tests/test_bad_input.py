"""Bad input: one line `error: ...` naming the problem, exit 2, no traceback, nothing overwritten.

Every case runs the real script the way a user would and hashes the run folders and datasets it
could touch before and after.
"""
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoint import load
from conftest import ROOT, TINY, make_char_dataset, run_script


def digest(*paths):
    """{file: sha256} of every file under `paths` (a missing path holds nothing)."""
    found = {}
    for top in map(str, paths):
        files = [top] if os.path.isfile(top) else [os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs]
        for path in files:
            with open(path, "rb") as f:
                found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


def assert_one_line_error(p, message):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    assert message in lines[0], lines[0]
    assert "Traceback" not in p.stderr


@pytest.fixture(scope="module")
def trained(char_data, tmp_path_factory):
    """A finished tiny run (checkpoints at steps 2 and 4): the run to resume, and a teacher."""
    out = tmp_path_factory.mktemp("trained")
    run_script("train.py", *TINY, f"dataset={char_data}", f"out_dir={out}", "max_iters=4",
               "eval_interval=2", "final_eval=False")
    return str(out)


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """A char dataset with another vocabulary (9 characters)."""
    return make_char_dataset(str(tmp_path_factory.mktemp("other") / "data"), "abcdefgh " * 500)


TORN_JSON = '{"model_type": '
HF_CONFIG = json.dumps(dict(model_type="gpt2", n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=65))


class Case:
    """Where one case runs: tmp folders, a copy of the trained run, and the base arguments."""

    def __init__(self, tmp, char_data, trained, other_data):
        self.tmp, self.data, self.trained, self.other = tmp, char_data, trained, other_data
        self.out = tmp / "out"
        self.watch = [self.out, char_data, trained, other_data]

    def base(self, data=None):
        return [*TINY, f"dataset={data or self.data}", f"out_dir={self.out}", "max_iters=2"]

    def run_copy(self):
        """The trained run copied into out (separate files, so damaging one damages only it)."""
        shutil.copytree(self.trained, self.out)
        return self.out

    def data_copy(self, name):
        path = self.tmp / name
        shutil.copytree(self.data, path)
        self.watch.append(path)
        return path

    def hf_folder(self, config=HF_CONFIG, safetensors=None):
        path = self.tmp / "hf"
        path.mkdir()
        (path / "config.json").write_text(config)
        if safetensors is not None:
            (path / "model.safetensors").write_bytes(safetensors)
        self.watch.append(path)
        return path


def empty_corpus(c):
    docs = c.tmp / "docs"
    docs.mkdir()
    (docs / "empty.txt").write_text("")
    (docs / "blank.txt").write_text("  \n\n")
    c.watch.append(docs)
    return "prepare/text.py", [f"input={docs}", f"out={c.out}", "tokenizer=char"], "no non-empty .txt files"


def odd_bin(c):
    data = c.data_copy("odd")
    with open(data / "train.bin", "ab") as f:
        f.write(b"\0")
    return "train.py", c.base(data), "not a whole number of uint16 tokens"


def no_meta(c):
    data = c.data_copy("nometa")
    (data / "meta.json").unlink()
    return "train.py", c.base(data), "has no meta.json"


def vocab_vs_checkpoint(c):
    c.run_copy()
    return "train.py", [*c.base(c.other), "init_from=resume", "max_iters=6"], "different vocab sizes"


def block_vs_split(c):
    small = make_char_dataset(str(c.tmp / "small"), "To be, or not to be, that is the question. " * 7)
    c.watch.append(small)
    return "train.py", c.base(small), "larger than the val split"


def truncated_checkpoint(c):
    out = c.run_copy()
    size = os.path.getsize(out / "ckpt.pt")
    with open(out / "ckpt.pt", "r+b") as f:
        f.truncate(size // 2)
    return "train.py", [*c.base(), "init_from=resume", "max_iters=6"], "truncated or corrupt"


def truncated_teacher(c):
    bad = c.tmp / "teacher.pt"
    with open(os.path.join(c.trained, "ckpt.pt"), "rb") as f:
        bad.write_bytes(f.read()[:5000])
    c.watch.append(bad)
    return "distill.py", [*c.base(), f"teacher={bad}"], "truncated or corrupt"


def out_dir_taken(c):
    c.run_copy()
    return "train.py", c.base(), "already holds a run's checkpoint"


def plain_file(c, name="notes.txt", content="a note, not a checkpoint\n"):
    path = c.tmp / name
    path.write_text(content)
    c.watch.append(path)
    return path


def torn_meta(c):
    data = c.data_copy("torn_meta")
    (data / "meta.json").write_text(TORN_JSON)
    return "train.py", c.base(data), "meta.json is not valid JSON"


def binary_config(c):
    path = plain_file(c, "pickled.py")
    path.write_bytes(pickle.dumps({"batch_size": 2}))
    return "train.py", [path, *c.base()], "pickled.py is not UTF-8 text"


def config_without_suffix(c):
    plain_file(c, "small.py", "batch_size = 2\n")
    return "train.py", [c.tmp / "small", *c.base()], f"did you mean {c.tmp / 'small'}.py?"


# values outside a key's LIMITS, files where folders belong (and the reverse), binary files as text
LIMIT_CASES = {
    "batch_size_zero": lambda c: ("train.py", [*c.base(), "batch_size=0"], "batch_size=0: must be >= 1"),
    "batch_size_negative": lambda c: ("train.py", [*c.base(), "batch_size=-3"], "batch_size=-3: must be >= 1"),
    "distill_alpha": lambda c: ("distill.py", [*c.base(), f"teacher={c.trained}", "alpha=1.5"],
                                "alpha=1.5: must be in [0, 1]"),
    "sample_top_p": lambda c: ("sample.py", [f"source={c.trained}", "top_p=0"], "top_p=0.0: must be in (0, 1]"),
    "evaluate_batch_size": lambda c: ("evaluate.py", [f"models={c.trained}", f"dataset={c.data}", "batch_size=0"],
                                      "batch_size=0: must be >= 1"),
    "out_dir_is_a_file": lambda c: ("train.py", [*c.base(), f"out_dir={plain_file(c)}"],
                                    "that is a file, not a folder"),
    "out_dir_under_a_file": lambda c: ("train.py", [*c.base(), f"out_dir={plain_file(c) / 'run'}"],
                                       "cannot be created: " + str(c.tmp / "notes.txt") + " is a file"),
    "sample_out_is_a_folder": lambda c: ("sample.py", [f"source={c.trained}", f"prompts={plain_file(c)}",
                                                       f"out={c.data}"], "that is a folder, not a file"),
    "prepare_out_is_a_file": lambda c: ("prepare/text.py", [f"input={plain_file(c)}", f"out={plain_file(c)}"],
                                        "that is a file, not a folder"),
    "dataset_is_a_file": lambda c: ("train.py", c.base(plain_file(c)), "is a file; a dataset is the folder"),
    "meta_json_torn": torn_meta,
    "config_file_binary": binary_config,
    "config_file_without_suffix": config_without_suffix,
    "key_without_value": lambda c: ("train.py", [*c.base(), "batch_size", "32"], "batch_size needs a value"),
    "teacher_layers_not_numbers": lambda c: ("distill.py", [*c.base(), f"teacher={c.trained}", "n_embd=32",
                                                            "student_init=teacher_layers", "teacher_layers=a,b"],
                                             "teacher_layers='a,b': 'a' is not a valid int"),
    "start_file_binary": lambda c: ("sample.py", [f"source={c.trained}", f"start=FILE:{c.trained}/ckpt.pt"],
                                    "ckpt.pt: not UTF-8 text"),
    "evaluate_text_binary": lambda c: ("evaluate.py", [f"models={c.trained}", f"text={c.trained}/ckpt.pt"],
                                       "ckpt.pt: not UTF-8 text"),
    "prompts_file_is_a_folder": lambda c: ("sample.py", [f"source={c.trained}", f"prompts={c.data}",
                                                         f"out={c.tmp / 'o.jsonl'}"],
                                           "that is a folder; name a text file"),
}

# a file that is no checkpoint, wherever a checkpoint is read
NOT_A_CHECKPOINT = "is not a checkpoint (not a torch zip or pickle file)"
CHECKPOINT_CASES = {
    "teacher_text_file": lambda c: ("distill.py", [*c.base(), f"teacher={plain_file(c)}"], NOT_A_CHECKPOINT),
    "init_from_text_file": lambda c: ("train.py", [*c.base(), f"init_from={plain_file(c)}"], NOT_A_CHECKPOINT),
    "sample_text_file": lambda c: ("sample.py", [f"source={plain_file(c)}"], NOT_A_CHECKPOINT),
    "evaluate_text_file": lambda c: ("evaluate.py", [f"models={plain_file(c)}", f"dataset={c.data}"],
                                     NOT_A_CHECKPOINT),
    "teacher_empty_file": lambda c: ("distill.py", [*c.base(), f"teacher={plain_file(c, 'empty.pt', '')}"],
                                     "empty.pt is empty (0 bytes): not a checkpoint"),
}

CASES = {
    "unknown_key": lambda c: ("train.py", [*c.base(), "nonsense_key=3"], "unknown config key 'nonsense_key'"),
    "wrong_type": lambda c: ("train.py", [*c.base(), "max_iters=fast"], "max_iters='fast' is a str"),
    "config_file_missing": lambda c: ("train.py", [str(c.tmp / "nope.py"), *c.base()], "config file not found"),
    "data_folder_missing": lambda c: ("train.py", c.base(c.tmp / "nodata"), "data folder not found"),
    "empty_corpus": empty_corpus,
    "bin_not_whole_tokens": odd_bin,
    "meta_json_missing": no_meta,
    "vocab_disagrees_with_checkpoint": vocab_vs_checkpoint,
    "block_size_beyond_split": block_vs_split,
    "resume_without_checkpoint": lambda c: ("train.py", [*c.base(), "init_from=resume"], "checkpoint not found"),
    "truncated_checkpoint_resume": truncated_checkpoint,
    "out_dir_holds_another_run": out_dir_taken,
    "unknown_dtype": lambda c: ("train.py", [*c.base(), "dtype=float64"], "dtype='float64'"),
    "n_embd_not_divisible_by_n_head": lambda c: ("train.py", [*c.base(), "n_embd=30", "n_head=4"],
                                                 "not divisible by n_head=4"),
    "teacher_missing": lambda c: ("distill.py", [*c.base(), f"teacher={c.tmp / 'no_teacher'}"], "checkpoint not found"),
    "teacher_truncated": truncated_teacher,
    "teacher_tokenizer_mismatch": lambda c: ("distill.py", [*c.base(c.other), f"teacher={c.trained}"],
                                             "must share one tokenizer"),
    "teacher_layers_width": lambda c: ("distill.py", [*c.base(), f"teacher={c.trained}", "n_embd=48",
                                                      "student_init=teacher_layers"], "needs the teacher's width"),
    "teacher_context_too_short": lambda c: ("distill.py", [*c.base(), f"teacher={c.trained}", "block_size=64"],
                                            "exceeds the teacher's context 32"),
    "hf_teacher_without_weights": lambda c: ("distill.py", [*c.base(), f"teacher={c.hf_folder()}"],
                                             "holds no weights"),
    "hf_teacher_corrupt_safetensors": lambda c: (
        "distill.py", [*c.base(), f"teacher={c.hf_folder(safetensors=b'garbage')}"], "model.safetensors"),
    "hf_teacher_broken_config_json": lambda c: (
        "distill.py", [*c.base(), "teacher=" + str(c.hf_folder(config=TORN_JSON))], "config.json"),
    "hf_teacher_config_missing_sizes": lambda c: (
        "distill.py", [*c.base(), f"teacher={c.hf_folder(config='{}')}"], "n_layer"),
    **LIMIT_CASES,
    **CHECKPOINT_CASES,
}


@pytest.mark.parametrize("make", CASES.values(), ids=CASES.keys())
def test_one_line_error_and_nothing_touched(make, tmp_path, char_data, trained, other_data):
    c = Case(tmp_path, char_data, trained, other_data)
    script, args, message = make(c)
    before = digest(*c.watch)
    p = run_script(script, *args, check=False)
    assert_one_line_error(p, message)
    assert digest(*c.watch) == before


def test_debug_shows_the_traceback(char_data, tmp_path):
    p = run_script("train.py", *TINY, f"dataset={tmp_path / 'nodata'}", f"out_dir={tmp_path / 'out'}",
                   "debug=True", check=False)
    assert p.returncode == 2 and "Traceback (most recent call last)" in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: data folder not found")


def test_overwrite_true_starts_over(char_data, trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    run_script("train.py", *TINY, f"dataset={char_data}", f"out_dir={out}", "max_iters=2",
               "eval_interval=100", "final_eval=False", "overwrite=True")
    assert load(out)["step"] == 2 and load(out)["config"]["max_iters"] == 2


def test_overwrite_true_leaves_no_checkpoint_of_the_old_run(char_data, trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)  # steps 2 and 4
    run_script("train.py", *TINY, f"dataset={char_data}", f"out_dir={out}", "max_iters=2", "eval_interval=2",
               "final_eval=False", "overwrite=True", "seed=7")
    assert sorted(f for f in os.listdir(out) if f.startswith("ckpt_")) == ["ckpt_00000002.pt"]


def test_accumulation_not_divisible_by_world_size(char_data, tmp_path):
    out = tmp_path / "out"
    before = digest(char_data)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *TINY, f"dataset={char_data}", f"out_dir={out}", "max_iters=2",
                        "gradient_accumulation_steps=3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode != 0
    # rank 0 says it once; torchrun then prints its own ChildFailedError report
    ours = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1, p.stderr[-3000:]
    assert "gradient_accumulation_steps=3 must be divisible by the world size 2" in ours[0]
    assert "trainer.py\", line" not in p.stderr and "train.py\", line" not in p.stderr
    assert digest(char_data) == before and not out.exists()


def test_sample_prompts_with_broken_lines_are_skipped_with_line_numbers(trained, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join([json.dumps({"prompt": "ORSINO:"}), "{broken", json.dumps({"prompt": 3}),
                                  json.dumps({"prompt": "VIOLA:"}), "[]"]) + "\n")
    out = tmp_path / "o.jsonl"
    p = run_script("sample.py", f"source={trained}", f"prompts={prompts}", f"out={out}", "num_samples=1",
                   "max_new_tokens=4")
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "skipped 3 of 5 lines" in warnings[0]
    assert "line 3 (prompt must be a string, got int)" in warnings[0] and "line 5 (not a JSON object" in warnings[0]
    assert "Traceback" not in p.stderr
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["ORSINO:", "VIOLA:"]


class Payload:
    """Unpickling this runs code: it creates `marker`. A safe loader never unpickles it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def plant(path, marker):
    torch.save(dict(model={"w": Payload(marker)}, model_args={}, step=1, optimizer={}), path)


def test_planted_payload_is_live(tmp_path):
    """The payload of the next test really runs when unpickled unsafely: its absence there proves
    refusal, not a dud."""
    plant(tmp_path / "evil.pt", tmp_path / "marker")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


ENTRY = {
    "train_resume": lambda evil, base, data: ("train.py", [*base, "init_from=resume"]),
    "train_init_from": lambda evil, base, data: ("train.py", [*base, f"init_from={evil}"]),
    "distill_teacher": lambda evil, base, data: ("distill.py", [*base, f"teacher={evil}"]),
    "sample_source": lambda evil, base, data: ("sample.py", [f"source={evil}", "max_new_tokens=2"]),
    "evaluate_models": lambda evil, base, data: ("evaluate.py", [f"models={evil}", f"dataset={data}"]),
    "hf_pytorch_model_bin": lambda evil, base, data: ("distill.py", [*base, f"teacher={evil.parent}"]),
}


@pytest.mark.parametrize("entry", ENTRY.values(), ids=ENTRY.keys())
def test_planted_pickle_payload_refused(entry, char_data, tmp_path):
    folder, marker = tmp_path / "run", tmp_path / "marker"
    folder.mkdir()
    evil = folder / "ckpt.pt"
    if entry is ENTRY["hf_pytorch_model_bin"]:
        evil = folder / "pytorch_model.bin"
        (folder / "config.json").write_text(HF_CONFIG)
    plant(evil, marker)
    base = [*TINY, f"dataset={char_data}", f"out_dir={folder}", "max_iters=2"]
    script, args = entry(evil, base, char_data)
    before = digest(folder, char_data)
    p = run_script(script, *args, check=False)
    assert_one_line_error(p, "refused")
    assert not marker.exists()
    assert digest(folder, char_data) == before
