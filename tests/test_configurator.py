"""Config files and key=value overrides: parsed, type-checked, and every shipped config valid.

The fuzzed tests hold the configurator to one contract over generated input: every argument list
and every config file either parses to exactly what it says, or fails with a one-line UserError;
never a traceback.
"""
import ast
import glob
import math
import os
import re
import tempfile

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from configurator import HELP_WORDS, OUT_DIR, OUT_FILE, UserError, check_limits, describe, load_config

DEFAULTS = dict(lr=1e-3, steps=10, name="run", flag=False, tags=None, sizes=(1, 2))
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# values of each key's type, and Python literals for the key whose default is None
LITERALS = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8)
                        | st.floats(allow_nan=False, allow_infinity=False),
                        lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
                        | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
VALUES = dict(lr=st.floats(allow_nan=False, allow_infinity=False) | st.integers(), steps=st.integers(),
              name=st.text(), flag=st.booleans(), tags=LITERALS,
              sizes=st.lists(st.integers(), max_size=4).map(tuple))


def test_overrides_types_and_equals_signs():
    cfg = load_config(DEFAULTS, ["lr=3", "--steps=20", "name=out/a=b", "flag=True", "tags=[1, 2]"])
    assert cfg == dict(DEFAULTS, lr=3.0, steps=20, name="out/a=b", flag=True, tags=[1, 2])
    assert isinstance(cfg["lr"], float)
    assert load_config(DEFAULTS, ["--flag"])["flag"] is True  # a bare --key turns a bool on


@pytest.mark.parametrize("arg,message", [
    ("stepz=3", "did you mean steps"), ("steps=1.5", "expected an int"), ("flag=1", "expected a bool"),
    ("nope.py", "config file not found"), ("--steps", "--steps needs a value: steps=VALUE"),
    ("lr=" + "9" * 400, "too large for a float"), ("sizes=(1, 2.5)", "sizes[1]=2.5 is a float"),
    ("sizes=[1]", "is a list, expected a tuple"), ("steps=None", "is a NoneType, expected an int"),
    ("steps", "steps needs a value: steps=VALUE"), ("flag", "flag needs a value: flag=True"),
    ("steps=1e4", "is a float, expected an int like the default 10; write 10000")])
def test_rejected(arg, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(DEFAULTS, [arg])


def test_config_file_then_overrides(tmp_path):
    f = tmp_path / "c.py"
    f.write_text('"""doc"""\nsteps = 4 * 5\nname = "x"\n')
    assert load_config(DEFAULTS, [str(f), "name=y"]) == dict(DEFAULTS, steps=20, name="y")
    f.write_text("import os\n")
    with pytest.raises(UserError, match="only `name = value` lines"):
        load_config(DEFAULTS, [str(f)])


@pytest.mark.parametrize("content,message", [
    (b"\x80\x02}q\x00.", "is not UTF-8 text"), (b"steps = 1\x00", "c.py: syntax error in config file: .*null bytes"),
    (b"steps = (" * 200, "syntax error"), (b"lr = 1e999 - 1e999", "lr is nan, not a number"),
    (b"name = 10 ** 5000", "<an int too long to print> is an int"),
    (b"name = [10 ** 5000]", "<a list holding an int too long to print> is a list"), (b"steps = 1 / 0", "division by zero")])
def test_config_file_contents_rejected(tmp_path, content, message):
    f = tmp_path / "c.py"
    f.write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        load_config(DEFAULTS, [str(f)])
    assert "\n" not in str(e.value)


def test_config_file_path_mistakes(tmp_path):
    (tmp_path / "c.py").write_text("steps = 3\n")
    with pytest.raises(UserError, match=r"did you mean .*c\.py\?"):
        load_config(DEFAULTS, [str(tmp_path / "c")])
    with pytest.raises(UserError, match="is a folder"):
        load_config(DEFAULTS, [str(tmp_path)])


def test_every_shipped_config_is_valid():
    from distill import DEFAULTS as distill_defaults
    from train import DEFAULTS as train_defaults
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config")
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    assert len(files) >= 5
    for path in files:
        name = os.path.basename(path)
        if name.startswith("classify"):
            from classify import DEFAULTS as defaults
        elif name.startswith("distill"):
            defaults = distill_defaults
        else:
            defaults = train_defaults
        load_config(defaults, [path])


# ---------------------------------------------------------------- fuzzed


def as_typed(key, value):
    """How a user types a value: as it is for a key whose default is text (taken as typed), as a
    Python literal for the others."""
    return value if isinstance(DEFAULTS[key], str) else repr(value)


def too_large(value):
    """An int that no float can hold."""
    try:
        float(value)
    except OverflowError:
        return True
    return False


def meant(key, value):
    """The value a key holds after `key=<value>`: an int given for a float default is a float."""
    return float(value) if isinstance(DEFAULTS[key], float) else value


@FUZZ
@given(st.sampled_from(sorted(VALUES)).flatmap(lambda key: st.tuples(st.just(key), VALUES[key])),
       st.sampled_from(["", "-", "--"]))
@example(("name", "a=b=c"), "")
@example(("lr", 10 ** 309), "")
def test_fuzzed_override_parses_to_what_was_typed(key_value, dashes):
    key, value = key_value
    arg = f"{dashes}{key}={as_typed(key, value)}"
    if isinstance(DEFAULTS[key], float) and too_large(value):
        with pytest.raises(UserError, match="too large for a float"):
            load_config(DEFAULTS, [arg])
        return
    got = load_config(DEFAULTS, [arg])[key]
    assert got == meant(key, value) and type(got) is type(meant(key, value))


def intended(argv):
    """The config `argv` means, worked out directly from the rules (None: it must be refused)."""
    config = dict(DEFAULTS)
    for arg in argv:
        if "=" not in arg:
            if arg in HELP_WORDS:
                config["help"] = True
            elif arg.startswith("-") and isinstance(DEFAULTS.get(arg.lstrip("-")), bool):
                config[arg.lstrip("-")] = True
            else:
                return None  # a config file that does not exist, or --key of a non-bool key
            continue
        key, raw = arg.split("=", 1)
        key = key.lstrip("-")
        if key not in DEFAULTS:
            return None
        default = DEFAULTS[key]
        if isinstance(default, str):
            config[key] = raw
            continue
        try:
            value = ast.literal_eval(raw)
        except Exception:
            value = raw  # not a literal: the text itself
        if default is None:
            config[key] = value
        elif isinstance(default, bool) != isinstance(value, bool) or not (
                isinstance(value, type(default)) or (isinstance(default, float) and type(value) is int)):
            return None
        elif isinstance(default, tuple) and not all(type(v) is int for v in value):
            return None
        elif isinstance(default, float) and too_large(value):
            return None
        else:
            config[key] = float(value) if isinstance(default, float) else value
    return config


KEYS = sorted(DEFAULTS) + ["help", "nope", ""]


# text in the grammar of Python literals (sets and dict keys included, whose members must be
# hashable): finds what plain random text almost never spells


def joined(left, right):
    return lambda items: left + ", ".join(items) + right


LITERAL_TEXT = st.recursive(
    st.sampled_from(["1", "-1", "1.5", "1e999", "-1e999", "'a'", "None", "True", "1j", "0x1f", "1_0", "nan", "--1"]),
    lambda inner: st.lists(inner, max_size=3).map(joined("[", "]"))
    | st.lists(inner, max_size=3).map(joined("(", ",)"))
    | st.lists(inner, min_size=1, max_size=3).map(joined("{", "}"))
    | st.lists(st.builds("{}: {}".format, inner, inner), max_size=2).map(joined("{", "}"))
    | st.builds("{} + {}".format, inner, inner), max_leaves=6)
ARGS = st.one_of(
    st.text(),
    st.builds(lambda dashes, key, raw: f"{dashes}{key}={raw}", st.sampled_from(["", "--"]),
              st.sampled_from(KEYS), st.text() | LITERAL_TEXT),
    st.sampled_from(list(HELP_WORDS) + ["--flag", "--steps", "--nope", "-", "--", "="]))


@FUZZ
@given(st.lists(ARGS, max_size=4))
@example(["tags=" + "-" * 100000 + "1"])  # too deep for the parser: taken as text
@example(["nope\nsecond=1"])
def test_fuzzed_arguments_parse_or_fail_in_one_line(argv):
    expected = intended(argv)
    try:
        config = load_config(DEFAULTS, argv)
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        assert expected is None, (argv, str(e))
        return
    assert config == expected


def config_file_text(values, comments):
    lines = ['"""a config file"""']
    for key, value in values.items():
        lines.append(f"{key} = {value!r}" + ("  # why" if comments else ""))
    return "\n".join(lines) + "\n"


FILE_DIR = tempfile.mkdtemp(prefix="configurator_fuzz_")


def write(content):
    path = os.path.join(FILE_DIR, "config.py")
    with open(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


@FUZZ
@given(st.fixed_dictionaries({}, optional={k: v for k, v in VALUES.items()}), st.booleans())
def test_fuzzed_config_file_parses_to_its_assignments(values, comments):
    if too_large(values.get("lr", 0)):
        values["lr"] = 1.0
    config = load_config(DEFAULTS, [write(config_file_text(values, comments))])
    assert config == dict(DEFAULTS, **{k: meant(k, v) for k, v in values.items()})


@FUZZ
@given(st.text() | st.binary() | st.builds("{} = {}\n".format, st.sampled_from(KEYS[:-1]), st.text() | LITERAL_TEXT))
@example("steps = 2 ** 2 ** 2\nlr = steps / 4\n")
@example("\ufeffsteps = 3\n")
@example("tags = 1e999 - 1e999\n")
def test_fuzzed_config_file_contents_parse_or_fail_in_one_line(content):
    try:
        config = load_config(DEFAULTS, [write(content)])
    except UserError as e:
        assert str(e) and "\n" not in str(e)
        return
    text = (content if isinstance(content, bytes) else content.encode("utf-8")).decode("utf-8-sig")
    assigned = {}
    exec(text, {"__builtins__": {}}, assigned)  # what the file says, run as Python
    assigned.pop("__doc__", None)  # exec keeps a leading string as the docstring
    # compared as text: a nan (taken by the key whose default is None) equals no other nan
    assert repr(config) == repr(dict(DEFAULTS, **{k: meant(k, v) for k, v in assigned.items()}))


# ---------------------------------------------------------------- limits


@pytest.mark.parametrize("rule,inside,outside,words", [
    ("[1, inf)", [1, 2, 10 ** 30], [0, -3, -math.inf], ">= 1"),
    ("(0, inf)", [1e-300, 3.0], [0, 0.0, -1.0, math.inf, math.nan], "> 0"),
    ("[0, 1)", [0, 0.5, 0.999], [1, 1.0, -0.001, math.nan], "in [0, 1)"),
    ("(0, 1]", [1, 0.25], [0, 1.5], "in (0, 1]"),
    (("cosine", "linear"), ["cosine", "linear"], ["cos", ""], "one of cosine, linear"),
])
def test_limits(rule, inside, outside, words):
    assert describe(rule) == words
    for value in inside:
        check_limits(dict(k=value), dict(k=1), dict(k=rule))
    for value in outside:
        with pytest.raises(UserError, match=f"k={value!r}: must be "):
            check_limits(dict(k=value), dict(k=1), dict(k=rule))


@FUZZ
@given(st.integers(-5, 5), st.integers(-5, 5), st.booleans(), st.booleans(),
       st.floats(-10, 10) | st.integers(-10, 10))
def test_fuzzed_interval(lo, hi, lo_closed, hi_closed, x):
    rule = f"{'[' if lo_closed else '('}{lo}, {hi}{']' if hi_closed else ')'}"
    inside = (lo <= x if lo_closed else lo < x) and (x <= hi if hi_closed else x < hi)
    try:
        check_limits(dict(k=x), dict(k=0), dict(k=rule))
        assert inside, (rule, x)
    except UserError:
        assert not inside, (rule, x)


def test_output_paths(tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("x")
    limits = dict(out_dir=OUT_DIR, out=OUT_FILE)
    defaults = dict(out_dir="out/run", out="")

    def problem(**config):
        with pytest.raises(UserError) as e:
            check_limits(dict(dict(out_dir=str(tmp_path / "run"), out=""), **config), defaults, limits)
        return str(e.value)

    assert "that is a file, not a folder" in problem(out_dir=str(plain))
    assert f"cannot be created: {plain} is a file" in problem(out_dir=str(plain / "sub" / "run"))
    assert "that is a folder, not a file" in problem(out=str(tmp_path))
    assert "name a folder to write" in problem(out_dir="")  # required: its default is not empty
    assert "holds no null character" in problem(out_dir="run\0")
    check_limits(dict(out_dir=str(tmp_path / "a" / "b"), out=str(tmp_path / "r.json")), defaults, limits)
    check_limits(dict(out_dir=str(tmp_path), out=""), defaults, limits)  # empty: not given
