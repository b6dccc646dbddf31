"""`help` on every script: each key with its default and the doc written beside it in the source."""
import importlib
import os

import pytest

from configurator import COMMON, describe, run
from conftest import ROOT, run_script

SCRIPTS = ["train.py", "distill.py", "sample.py", "evaluate.py", "classify.py", "bench.py", "demo.py",
           "convert.py", "prepare/shakespeare.py", "prepare/text.py", "prepare/jsonl.py",
           "prepare/openwebtext.py", "prepare/babylm.py", "prepare/wikitext.py", "prepare/tokenizer.py", "cache_teacher.py",
           "serve.py"]


def module_of(script):
    return importlib.import_module(script[:-3].replace("/", "."))


def source_text(*paths):
    """The files at `paths`, one after the other."""
    text = ""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text += f.read()
    return text


def shown_docs(output, defaults):
    """{key: text after its default} from help's output, for each key of `defaults`."""
    docs = {}
    for line in output.splitlines():
        name, sep, rest = line.partition(" = ")
        name = name.strip()
        if sep and name in defaults:
            value = repr(defaults[name])
            assert rest.startswith(value), (name, rest)
            docs[name] = rest[len(value):].strip()
    return docs


def test_every_script_is_listed():
    found = {f for f in os.listdir(ROOT) if f.endswith(".py")} | {
        "prepare/" + f for f in os.listdir(os.path.join(ROOT, "prepare")) if f.endswith(".py")}
    scripts = set()
    for path in found:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            if "run(main, DEFAULTS" in f.read():
                scripts.add(path)
    assert scripts == set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_key_with_its_doc(script):
    module = module_of(script)
    defaults = {**module.DEFAULTS, **COMMON}
    limits = getattr(module, "LIMITS", {})
    assert set(limits) <= set(module.DEFAULTS), "a LIMITS key that is no key"
    p = run_script(script, "help")
    assert p.stderr == ""
    docs = shown_docs(p.stdout, defaults)
    assert set(docs) == set(defaults), set(defaults) - set(docs)
    # the doc is the comment beside the key in the script or the modules its DEFAULTS come from
    sources = source_text(os.path.join(ROOT, script), *{os.path.join(ROOT, m + ".py")
                                                        for m in ("trainer", "configurator", "server", "api_client")})
    for key, doc in docs.items():
        assert doc, f"{script}: {key} has no doc"
        limit = f" [{describe(limits[key])}]" if key in limits else ""
        assert doc.endswith(limit) and f"# {doc[:len(doc) - len(limit)]}" in sources, (key, doc)


@pytest.mark.parametrize("args", [["help=True"], ["--help"], ["-h"], ["help"], ["--help=True"],
                                  ["nonsense=3", "help"], ["batch_size=0", "-h"]])
def test_every_way_of_asking_for_help(args, capsys):
    import train
    assert run(train.main, train.DEFAULTS, train.LIMITS, argv=args) == 0
    out = capsys.readouterr().out
    assert "usage: python train.py" in out and "rows per micro-step on each rank [>= 1]" in out


def test_help_false_runs_the_script():
    p = run_script("convert.py", "help=False", check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: to='': must be one of ours, hf")
