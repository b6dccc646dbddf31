"""Config files and key=value overrides: parsed, type-checked, and every shipped config valid."""
import glob
import os

import pytest

from configurator import UserError, load_config

DEFAULTS = dict(lr=1e-3, steps=10, name="run", flag=False, tags=None)


def test_overrides_types_and_equals_signs():
    cfg = load_config(DEFAULTS, ["lr=3", "--steps=20", "name=out/a=b", "flag=True", "tags=[1, 2]"])
    assert cfg == dict(lr=3.0, steps=20, name="out/a=b", flag=True, tags=[1, 2])
    assert isinstance(cfg["lr"], float)


@pytest.mark.parametrize("arg,message", [("stepz=3", "did you mean steps"), ("steps=1.5", "expected an int"),
                                         ("flag=1", "expected a bool"), ("nope.py", "config file not found")])
def test_rejected(arg, message):
    with pytest.raises(UserError, match=message):
        load_config(DEFAULTS, [arg])


def test_config_file_then_overrides(tmp_path):
    f = tmp_path / "c.py"
    f.write_text('"""doc"""\nsteps = 4 * 5\nname = "x"\n')
    assert load_config(DEFAULTS, [str(f), "name=y"]) == dict(DEFAULTS, steps=20, name="y")
    f.write_text("import os\n")
    with pytest.raises(UserError, match="only `name = value` lines"):
        load_config(DEFAULTS, [str(f)])


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
