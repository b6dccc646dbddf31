"""inputs.py: comma lists, files and globs, text files and timestamped outputs, each bad value one
line naming its key or file:line."""
import os

import pytest

from configurator import UserError
from inputs import comma_list, expand_files, named_sources, read_text_file, timestamped
from model import GPT


def test_comma_lists():
    assert comma_list(" a, b ,,c,", "k") == ["a", "b", "c"] and comma_list("", "k") == []
    assert comma_list("0, 2,11", "teacher_layers", convert=int) == [0, 2, 11]
    with pytest.raises(UserError, match=r"teacher_layers='0,x': 'x' is not a valid int"):
        comma_list("0,x", "teacher_layers", convert=int)
    assert comma_list("attn, mlp", "lora_targets", choices=GPT.lora_targets) == ["attn", "mlp"]
    for bad in ("attn,nope", " , "):
        with pytest.raises(UserError, match="lora_targets=.*: choose from attn, attn_proj, mlp, mlp_proj"):
            comma_list(bad, "lora_targets", choices=GPT.lora_targets)


def test_named_sources():
    assert named_sources("out/t/,s=out/student,gpt2", "models") == [("t", "out/t/"), ("s", "out/student"),
                                                                      ("gpt2", "gpt2")]
    with pytest.raises(UserError, match="models= gives two models the same name"):
        named_sources("a/run,b/run", "models")
    with pytest.raises(UserError, match="compare= is required"):
        named_sources(" , ", "compare")


def test_files_folders_and_globs(tmp_path):
    for name in ("b.txt", "a.txt", "sub/c.txt", "sub/d.jsonl", "sub/e.md", "[x]/f.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    d = str(tmp_path)
    assert expand_files(d, ("txt",)) == [f"{d}/[x]/f.txt", f"{d}/a.txt", f"{d}/b.txt", f"{d}/sub/c.txt"]
    assert expand_files(f"{d}/sub,{d}/b.txt", ("txt", "jsonl")) == [f"{d}/sub/c.txt", f"{d}/sub/d.jsonl",
                                                                    f"{d}/b.txt"]
    # a glob is taken as written: any matching file, whatever its extension
    assert expand_files(f"{d}/sub/*", ("txt",)) == [f"{d}/sub/c.txt", f"{d}/sub/d.jsonl", f"{d}/sub/e.md"]
    with pytest.raises(UserError, match=r"input: nothing matches '.*/nope\*\.txt'"):
        expand_files(f"{d}/a.txt,{d}/nope*.txt", ("txt",))


def test_text_files_not_utf8_binary_folders_or_missing(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\nline two \xff\n")
    with pytest.raises(UserError, match=r"t.txt:2: not UTF-8 text \(byte 22 of the file\)"):
        read_text_file(str(path), "text=")
    path.write_bytes(b"\xef\xbb\xbfline one\n")
    assert read_text_file(str(path), "text=") == "line one\n"  # without the byte-order mark
    path.write_bytes(b"PK\x03\x04\x00\x00\x08\x00\xff\xfe")  # the start of a zip archive
    with pytest.raises(UserError, match=r"^start=FILE:.*t.txt: not UTF-8 text but a binary file"):
        read_text_file(str(path), "start=FILE:")
    with pytest.raises(UserError, match="text=.*nope.txt: file not found"):
        read_text_file(str(tmp_path / "nope.txt"), "text=")
    with pytest.raises(UserError, match="text=.*: that is a folder; name a text file"):
        read_text_file(str(tmp_path), "text=")


def test_timestamped_names_never_collide(tmp_path, monkeypatch):
    import inputs
    monkeypatch.setattr(inputs.time, "strftime", lambda fmt: "20250101-120000")  # runs in one second
    first = timestamped(str(tmp_path), ".json")
    open(first, "w").close()
    second = timestamped(str(tmp_path), ".json")
    os.makedirs(second)
    assert (first, second) == (f"{tmp_path}/20250101-120000.json", f"{tmp_path}/20250101-120000-1.json")
    assert timestamped(str(tmp_path), ".json") == f"{tmp_path}/20250101-120000-2.json"
    assert timestamped(str(tmp_path / "new")) == f"{tmp_path}/new/20250101-120000"
