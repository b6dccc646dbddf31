"""Flat configs: Python files of assignments plus `key=value` overrides, and one-line user errors.

    python train.py config/shakespeare_char.py batch_size=32 --lr=3e-4 out_dir=out/x
    python train.py help                                   # every key, its default and its doc

Every script declares its defaults as a dict, one key per line (or a few sharing a line) with a
short comment beside it: that comment is the key's doc, read back from the source for `help`.
`load_config` applies config files in order, then overrides, type-checking each value against
its default; `run` then checks the script's LIMITS table, so a typo or an impossible value fails
in one line before any work starts.
"""
import ast
import difflib
import importlib.util
import io
import math
import os
import re
import sys
import tokenize
import traceback


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, never as a traceback."""


# keys every script has, beside its own
COMMON = dict(
    help=False,  # print the keys with their defaults and docs, then exit (also: help, -h, --help)
    debug=False,  # on an error, show the traceback as well as the one-line message
)
HELP_WORDS = ("help", "-h", "--help")

# path rules of a LIMITS table: a folder or a file the script writes (an empty value is allowed
# only where the default is empty: there it means "not given")
OUT_DIR, OUT_FILE = "folder to write", "file to write"
_INTERVAL = re.compile(r"([\[(])\s*(\S+?)\s*,\s*(\S+?)\s*([\])])")


def _show(value, width=60):
    """repr cut to `width`: a value in a message must not flood the line (or, for an int of
    more than 4300 digits, fail to print at all)."""
    try:
        text = repr(value)
    except ValueError:
        text = "<an int" if isinstance(value, int) else f"<a {type(value).__name__} holding an int"
        text += " too long to print>"
    return text if len(text) <= width else text[:width - 3] + "..."


def shown_path(path):
    """A path as typed, quoted only when it holds characters that would break the line."""
    return path if path.isprintable() else repr(path)


def first_line(text):
    return (str(text).strip().splitlines() or [""])[0][:200]


# ---------------------------------------------------------------- parsing


def _parse_value(raw):
    try:
        return ast.literal_eval(raw)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return raw  # bare strings need no quotes: out_dir=out/run1


def _kind(value):
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _check_one(key, value, default, origin):
    if isinstance(value, float) and math.isnan(value):
        raise UserError(f"{origin}: {key} is nan, not a number")
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            raise UserError(f"{origin}: {key}={_show(value)} is too large for a float") from None
    elif isinstance(value, type(default)):
        return value
    hint = ""
    if type(default) is int and isinstance(value, float) and value.is_integer():
        hint = f"; write {int(value)}"  # 1e4 is a float in Python
    raise UserError(f"{origin}: {key}={_show(value)} is {_kind(value)}, expected {_kind(default)} "
                    f"like the default {_show(default)}{hint}")


def _check_type(key, value, default, origin):
    if default is None:
        return value
    value = _check_one(key, value, default, origin)
    if isinstance(default, (tuple, list)) and default and len({type(d) for d in default}) == 1:
        # a sequence default of one element type (bench's gen_tokens=(128, 512)) wants that type
        value = type(value)(_check_one(f"{key}[{i}]", v, default[0], origin) for i, v in enumerate(value))
    return value


def _unknown(key, defaults, origin):
    close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run with help to list the keys"
    return UserError(f"{origin}: unknown config key {_show(key)}{hint}")


def _config_source(path):
    shown = shown_path(path)
    if os.path.isdir(path):
        raise UserError(f"config file {shown} is a folder; give a .py file of `name = value` lines")
    if not os.path.isfile(path):
        hint = f"; did you mean {shown}.py?" if os.path.isfile(path + ".py") else ""
        raise UserError(f"config file not found: {shown}{hint} (overrides are written key=value)")
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{shown} is not UTF-8 text: a config file is Python `name = value` lines") from None
    except OSError as e:
        raise UserError(f"cannot read config file {shown}: {e.strerror}") from None


def _read_config_file(path, defaults):
    source, shown = _config_source(path), shown_path(path)
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        where = f"{shown}:{e.lineno}" if e.lineno else shown
        raise UserError(f"{where}: syntax error in config file: {first_line(e.msg)}") from None
    except (ValueError, MemoryError, RecursionError) as e:  # null bytes, absurd nesting
        raise UserError(f"{shown}: not a Python config file ({type(e).__name__})") from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"{shown}:{node.lineno}: config files hold only `name = value` lines")
        key = node.targets[0].id
        try:
            # constants may refer to earlier keys of the same file (e.g. tokens = batch * block)
            value = eval(compile(ast.Expression(node.value), path, "eval"), {"__builtins__": {}},
                         dict(values))
        except Exception as e:
            raise UserError(f"{shown}:{node.lineno}: cannot evaluate {key}: {first_line(e)}") from None
        values[key] = value
    for key, value in values.items():
        if key not in defaults:
            raise _unknown(key, defaults, shown)
        values[key] = _check_type(key, value, defaults[key], shown)
    return values


def load_config(defaults, argv=None):
    """defaults: {key: default}. argv: config files and key=value / --key=value overrides; a bare
    --key sets a bool key to True."""
    argv = sys.argv[1:] if argv is None else argv
    config = dict(defaults)
    for arg in argv:
        if "=" not in arg:
            if arg in HELP_WORDS:
                config["help"] = True
            elif arg.startswith("-") or (arg in defaults and not os.path.exists(arg)):
                key = arg.lstrip("-")
                if key not in defaults:
                    raise _unknown(key, defaults, "command line")
                if not (isinstance(defaults[key], bool) and arg.startswith("-")):
                    example = "True" if isinstance(defaults[key], bool) else "VALUE"
                    raise UserError(f"command line: {arg} needs a value: {key}={example} (default "
                                    f"{_show(defaults[key])})")
                config[key] = True
            else:
                config.update(_read_config_file(arg, defaults))
            continue
        key, raw = arg.split("=", 1)  # split once: values may contain '='
        key = key.lstrip("-")
        if key not in defaults:
            raise _unknown(key, defaults, "command line")
        # a text default takes the text as typed: teacher_layers=0,2,4 is not a tuple
        value = raw if isinstance(defaults[key], str) else _parse_value(raw)
        config[key] = _check_type(key, value, defaults[key], "command line")
    return config


def format_config(config):
    width = max(len(k) for k in config)
    return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in config.items())


# ---------------------------------------------------------------- limits


def _bounds(rule):
    m = _INTERVAL.fullmatch(rule)
    if not m:
        raise ValueError(f"not an interval such as [1, inf): {rule!r}")
    return float(m[2]), m[1] == "[", float(m[3]), m[4] == "]"


def _number(x):
    return f"{x:g}"


def describe(rule):
    """A LIMITS rule in words: intervals "[1, inf)", "(0, 1]"; a tuple of allowed texts; OUT_DIR,
    OUT_FILE."""
    if isinstance(rule, tuple):
        return "one of " + ", ".join(choice or "''" for choice in rule)
    if rule in (OUT_DIR, OUT_FILE):
        return f"a {rule}"
    lo, lo_in, hi, hi_in = _bounds(rule)
    if hi == math.inf:
        return f"{'>=' if lo_in else '>'} {_number(lo)}"
    if lo == -math.inf:
        return f"{'<=' if hi_in else '<'} {_number(hi)}"
    return f"in {rule}"


def _in_interval(x, rule):
    lo, lo_in, hi, hi_in = _bounds(rule)
    # written so that nan fails every comparison
    return (lo <= x if lo_in else lo < x) and (x <= hi if hi_in else x < hi)


def _path_problem(path, rule):
    if "\0" in path:
        return "cannot be created: a path holds no null character"
    if os.path.exists(path):
        if os.path.isdir(path) != (rule == OUT_DIR):
            kind, other = ("folder", "file") if os.path.isdir(path) else ("file", "folder")
            return f"that is a {kind}, not a {other}; name a {rule}"
        return None if os.access(path, os.W_OK) else "cannot be written (permission denied)"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created: {shown_path(parent)} is a file, not a folder"
    return None if os.access(parent, os.W_OK) else f"cannot be created: {shown_path(parent)} is not writable"


def _problem(value, rule, default):
    if value is None:
        return None
    if isinstance(rule, tuple):
        return None if value in rule else f"must be {describe(rule)}"
    if rule in (OUT_DIR, OUT_FILE):
        if not value:
            return None if not default else f"name a {rule}"
        return _path_problem(value, rule)
    items = value if isinstance(value, (tuple, list)) else [value]
    return None if all(_in_interval(x, rule) for x in items) else f"must be {describe(rule)}"


def check_limits(config, defaults, limits):
    """One line for the first value outside its key's LIMITS rule."""
    for key, rule in limits.items():
        problem = _problem(config[key], rule, defaults[key])
        if problem:
            raise UserError(f"{key}={_show(config[key])}: {problem}")


# ---------------------------------------------------------------- help


def _comments(source):
    """{line: comment text} of every comment in `source`."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}


def key_docs(path, name="DEFAULTS"):
    """{key: doc} of the `name = dict(...)` in the file at `path`: each key's doc is the comment
    at the end of the line its value ends on. A dict imported from a module (`from trainer import
    DEFAULTS`), or extended by this one (`dict(BASE, ...)`, `dict(..., **BASE)`), lends its keys' docs."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    tree, comments = ast.parse(source), _comments(source)
    imported = {a.asname or a.name: (node.module, a.name) for node in tree.body
                if isinstance(node, ast.ImportFrom) for a in node.names}

    def docs_of(base):
        spec = importlib.util.find_spec(imported[base][0])
        return key_docs(spec.origin, imported[base][1]) if spec and spec.origin else {}

    docs = docs_of(name) if name in imported else {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)):
            continue
        for base in node.value.args:
            if isinstance(base, ast.Name) and base.id in imported:
                docs.update(docs_of(base.id))
        for kw in node.value.keywords:
            if kw.arg is None:
                if isinstance(kw.value, ast.Name) and kw.value.id in imported:
                    docs.update(docs_of(kw.value.id))
            else:
                docs[kw.arg] = comments.get(kw.value.end_lineno, "")
    return docs


def usage(script, defaults, limits):
    """What `help` prints: the script's first docstring line, how to call it, and every key with
    its default, doc and limit."""
    docs = {**key_docs(__file__, "COMMON"), **key_docs(script)}
    with open(script, encoding="utf-8") as f:
        title = (ast.get_docstring(ast.parse(f.read())) or "").split("\n\n")[0].replace("\n", " ")
    shown = {k: repr(v) for k, v in defaults.items()}
    kw, vw = max(map(len, shown)), min(24, max(map(len, shown.values())))
    root = os.path.dirname(os.path.abspath(__file__))
    lines = [title, "", f"usage: python {os.path.relpath(script, root)} [config.py ...] [key=value ...] "
             "(config files in order, then overrides)", ""]
    for key, value in shown.items():
        limit = f" [{describe(limits[key])}]" if key in limits else ""
        lines.append(f"  {key:<{kw}} = {value:<{vw}}  {docs.get(key, '')}{limit}")
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point


def _wants_help(argv):
    for arg in argv:
        key, eq, raw = arg.partition("=")
        if arg in HELP_WORDS or (eq and key.lstrip("-") == "help" and _parse_value(raw) is True):
            return True
    return False


def run(main, defaults, limits=None, argv=None):
    """Entry point of every script: parse the config, check it against `limits` ({key: rule}, see
    describe), run `main(config)`; a UserError becomes one line on stderr and exit status 2 (a
    traceback only with debug=True). help prints the keys and exits, whatever else is given."""
    argv = sys.argv[1:] if argv is None else argv
    defaults, limits = {**defaults, **COMMON}, limits or {}
    debug = any(a.lstrip("-") == "debug=True" or a in ("--debug", "-debug") for a in argv)
    try:
        asked = _wants_help(argv)  # before parsing: help works even beside a mistake
        if not asked:
            config = load_config(defaults, argv)
            asked = config.pop("help")
        if asked:
            print(usage(sys.modules[main.__module__].__file__, defaults, limits))
            return 0
        check_limits(config, defaults, limits)
        main(config)
    except UserError as e:
        if debug:
            traceback.print_exc()
        # every rank reads the same config and data, so under torchrun rank 0 alone speaks: N
        # copies of one line interleave on a shared stderr
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    return 0
