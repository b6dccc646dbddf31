"""Flat configs: Python files of assignments plus `key=value` overrides, and one-line user errors.

    python train.py config/shakespeare_char.py batch_size=32 --lr=3e-4 out_dir=out/x

Every script declares its defaults as a dict; `load_config` applies config files in order, then
overrides, type-checking each value against its default so a typo fails before any work starts.
"""
import ast
import difflib
import os
import sys
import traceback


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, never as a traceback."""


def _parse_value(raw):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # bare strings need no quotes: out_dir=out/run1


def _check_type(key, value, default, origin):
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif isinstance(value, type(default)):
        return value
    raise UserError(f"{origin}: {key}={value!r} is a {type(value).__name__}, expected a "
                    f"{type(default).__name__} like the default {default!r}")


def _unknown(key, defaults, origin):
    close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run with help=True to list the keys"
    return UserError(f"{origin}: unknown config key '{key}'{hint}")


def _read_config_file(path, defaults):
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    with open(path) as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: syntax error in config file: {e.msg}") from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"{path}:{node.lineno}: config files hold only `name = value` lines")
        key = node.targets[0].id
        try:
            # constants may refer to earlier keys of the same file (e.g. tokens = batch * block)
            value = eval(compile(ast.Expression(node.value), path, "eval"), {"__builtins__": {}},
                         dict(values))
        except Exception as e:
            raise UserError(f"{path}:{node.lineno}: cannot evaluate {key}: {e}") from None
        values[key] = value
    for key, value in values.items():
        if key not in defaults:
            raise _unknown(key, defaults, path)
        values[key] = _check_type(key, value, defaults[key], path)
    return values


def load_config(defaults, argv=None):
    """defaults: {key: default}. argv: config files and key=value / --key=value overrides."""
    argv = sys.argv[1:] if argv is None else argv
    config = dict(defaults)
    for arg in argv:
        if "=" not in arg:
            if arg in ("-h", "--help", "help"):
                config["help"] = True
                continue
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


def run(main, defaults, argv=None):
    """Entry point of every script: parse the config, run `main(config)`, turn UserError into one
    line on stderr and exit status 2 (a traceback only with debug=True)."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = {**defaults, "debug": False}
    debug = any(a.lstrip("-") in ("debug=True", "debug=1") for a in argv)
    try:
        config = load_config(defaults, argv)
        if config.pop("help", False):
            print(f"usage: {os.path.basename(sys.argv[0])} [config.py ...] [key=value ...]\n"
                  + format_config({k: v for k, v in defaults.items() if k != "help"}))
            return 0
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
