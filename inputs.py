"""What users hand the scripts, read the same way everywhere: comma lists, files/folders/globs,
JSONL files (with line numbers), Hugging Face datasets (a hub name or a local copy), and the
timestamped paths results go to when no out= is given.

Every bad input is one UserError line saying where it is (the key, or file:line) and what is
wrong with it.
"""
import codecs
import glob
import json
import os
import sys
import time

from configurator import UserError, first_line, shown_path

SHOW_BAD = 5  # bad lines listed by name in a warning or error; the rest are counted


# ---------------------------------------------------------------- comma lists


def comma_list(value, key, choices=None, convert=None):
    """The items of a comma-separated setting, stripped, empty ones dropped. choices: the allowed
    items (then at least one is needed); convert: e.g. int, applied to every item."""
    items = [s.strip() for s in str(value).split(",") if s.strip()]
    if choices is not None and (not items or any(s not in choices for s in items)):
        raise UserError(f"{key}={value!r}: choose from {', '.join(choices)} (comma-separated)")
    if convert is None:
        return items
    converted = []
    for s in items:
        try:
            converted.append(convert(s))
        except ValueError:
            raise UserError(f"{key}={value!r}: {s!r} is not a valid {convert.__name__}") from None
    return converted


def named_sources(spec, key):
    """[(name, source)] from "a,b" or "teacher=out/t,student=out/s"; a bare source is named by its
    folder. Names must differ: they label the rows of one table."""
    models = []
    for item in comma_list(spec, key):
        name, _, source = item.rpartition("=")
        models.append((name or os.path.basename(source.rstrip("/")) or source, source))
    if not models:
        raise UserError(f"{key}= is required: comma-separated checkpoints, HF folders or GPT-2 names")
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise UserError(f"{key}= gives two models the same name ({names}); name them: a=path1,b=path2")
    return models


# ---------------------------------------------------------------- files


def check_file(path, label):
    """One line unless `path`, which the user gave as `label` + path (e.g. text=, start=FILE:), is
    an existing file."""
    where = label + shown_path(path)
    if os.path.isdir(path):
        raise UserError(f"{where}: that is a folder; name a text file")
    if not os.path.isfile(path):
        raise UserError(f"{where}: file not found")


def read_text_file(path, label):
    """The whole text of the UTF-8 file the user gave as `label` + path (e.g. text=, start=FILE:),
    without the byte-order mark some editors write. A folder, a missing or unreadable file, a
    binary file and bytes that are not UTF-8 (named by their line) are one line each."""
    check_file(path, label)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{label}{shown_path(path)}: cannot be read ({e.strerror})") from None
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        if b"\0" in raw:  # text holds no null bytes; checkpoints, archives and images do
            raise UserError(f"{label}{shown_path(path)}: not UTF-8 text but a binary file; name a "
                            f"text file") from None
        at = start + e.start
        line = raw[:at].count(b"\n") + 1
        raise UserError(f"{shown_path(path)}:{line}: not UTF-8 text (byte {at + 1} of the file)") from None


def expand_files(spec, exts, key="input"):
    """Files named by a comma list of files, folders (searched recursively for files ending in one
    of `exts`) and globs, in the order given; a folder's or a glob's files in path order."""
    files = []
    for part in comma_list(spec, key):
        if os.path.isdir(part):
            found = (f for ext in exts
                     for f in glob.glob(os.path.join(glob.escape(part), "**", f"*.{ext}"), recursive=True))
            files += sorted(f for f in found if os.path.isfile(f))
        elif os.path.isfile(part):
            files.append(part)
        else:
            matched = sorted(f for f in glob.glob(part, recursive=True) if os.path.isfile(f))
            if not matched:
                raise UserError(f"{key}: nothing matches {part!r} (a file, a folder or a glob)")
            files += matched
    return files


# ---------------------------------------------------------------- JSONL


class BadRecord(Exception):
    """Raised by a record parser with the reason a JSON object is not a usable record."""


def field(record, key, blank_ok=False):
    """record[key] as a string; a missing, non-string or (unless blank_ok) blank value is a BadRecord."""
    value = record.get(key)
    if value is None:
        raise BadRecord(f"missing {key}")
    if not isinstance(value, str):
        raise BadRecord(f"{key} must be a string, got {type(value).__name__}")
    if not blank_ok and not value.strip():
        raise BadRecord(f"empty {key}")
    return value


def read_jsonl(path, parse, skip_bad=False):
    """[(line number, parse(object))] for every non-blank line of a JSONL file.

    parse(dict) returns the record or raises BadRecord. A line that is not UTF-8, not JSON, not an
    object, or that parse refuses is bad: without skip_bad the first one is a UserError
    "path:line: reason"; with skip_bad bad lines are left out and named in one warning on stderr,
    and a file with no good line is a UserError.
    """
    good, bad = [], []
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                parsed = _parse_line(raw, n, parse)
                if parsed is None:
                    continue
                reason, record = parsed
                if reason is None:
                    good.append((n, record))
                elif skip_bad:
                    bad.append((n, reason))
                else:
                    raise UserError(f"{path}:{n}: {reason}")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    if bad:
        listed = ", ".join(f"line {n} ({why})" for n, why in bad[:SHOW_BAD])
        more = f" and {len(bad) - SHOW_BAD} more" if len(bad) > SHOW_BAD else ""
        if not good:
            n, why = bad[0]
            raise UserError(f"{path}:{n}: {why}; no line is usable ({len(bad)} bad: {listed}{more})")
        print(f"warning: {path}: skipped {len(bad)} of {len(bad) + len(good)} lines: {listed}{more}",
              file=sys.stderr)
    return good


def _parse_line(raw, n, parse):
    """None for a blank line, else (None, record) or (reason, None)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text (byte {e.start + 1})", None
    if n == 1:
        text = text.removeprefix("\ufeff")  # the byte-order mark some editors write
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not JSON: {e.msg} at column {e.colno}", None
    except (ValueError, RecursionError) as e:  # e.g. an int of over 4300 digits, nesting too deep
        return f"not JSON: {type(e).__name__}", None
    if not isinstance(obj, dict):
        return f"not a JSON object (a {type(obj).__name__})", None
    if "\\u" in text and not _encodable(obj):
        # JSON may escape half of a surrogate pair alone; such a string cannot be encoded or written
        return "holds a lone surrogate escape (\\ud800-\\udfff), not text", None
    try:
        return None, parse(obj)
    except BadRecord as e:
        return str(e), None


def _encodable(obj):
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------- Hugging Face datasets


def hf_dataset(path, config=None, split=None, hint="", columns=()):
    """A Hugging Face dataset (its `split`, or all splits): a folder written by save_to_disk goes
    through load_from_disk, anything else (a hub name, a folder of data files) through
    load_dataset. hint: how to do without it, shown when it cannot be loaded. columns: the columns
    every split must have."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path} needs the datasets package: pip install datasets; or {hint}") from None
    if _is_saved_dataset(path):
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:
            raise UserError(f"{path}: cannot read the saved dataset ({type(e).__name__}: "
                            f"{first_line(e)})") from None
        ds = _split_of_saved(ds, path, split) if split else ds
    else:
        try:
            ds = datasets.load_dataset(path, config, split=split)
        except Exception as e:
            raise UserError(f"cannot load {path}{'/' + config if config else ''} ({type(e).__name__}: "
                            f"{first_line(e)}); offline, {hint}") from None
    for name, part in ds.items() if isinstance(ds, dict) else [(split, ds)]:
        missing = [c for c in columns if c not in part.column_names]
        if missing:
            raise UserError(f"{path}: the {name} split has no {missing[0]!r} column (it has "
                            f"{', '.join(part.column_names) or 'none'})")
    return ds


def _is_saved_dataset(path):
    return any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


def _split_of_saved(ds, path, split):
    if isinstance(ds, dict):
        if split not in ds:
            raise UserError(f"{path} holds the splits {', '.join(ds)}; it needs a {split!r} split")
        return ds[split]
    if split != "train":  # a lone Dataset saved without split names serves as the training data
        raise UserError(f"{path} holds one unnamed split; save a DatasetDict with a {split!r} split")
    return ds


# ---------------------------------------------------------------- where results go


def timestamped(folder, suffix=""):
    """folder/<YYYYmmdd-HHMMSS><suffix>, a name not yet taken: runs started in the same second get
    -1, -2, ... rather than one overwriting the other."""
    base = os.path.join(folder, time.strftime("%Y%m%d-%H%M%S"))
    path, n = base + suffix, 1
    while os.path.exists(path):
        path, n = f"{base}-{n}{suffix}", n + 1
    return path
