"""docs/guide/protocol.md states the authors' recipe, flatfast's defaults and the options that change them; its
defaults block must match the command line's, and the command line must point at it."""
import dataclasses
import re
from pathlib import Path

import pytest

PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "guide" / "protocol.md"


def _documented_defaults():
    block = re.search(r"## The defaults, as the command line has them.*?```\n(.*?)```", PROTOCOL.read_text(),
                      re.S).group(1)
    return dict(line.split(" = ", 1) for line in block.strip().splitlines())


def _as_text(value):
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def test_documented_defaults_are_the_command_lines():
    from flatfast.experiments import Config
    from flatfast.experiments import TemporalConfig

    configs = {"main": dataclasses.asdict(Config()), "temporal": dataclasses.asdict(TemporalConfig()),
               "quick": dataclasses.asdict(Config.quick())}
    documented = _documented_defaults()
    assert len(documented) >= 25
    for key, text in documented.items():
        which, field = key.split(".")
        assert field in configs[which], key
        actual = _as_text(configs[which][field])
        if isinstance(configs[which][field], float):
            assert float(text) == pytest.approx(configs[which][field]), key
        else:
            assert text == actual, (key, text, actual)


def test_the_command_line_and_the_module_point_at_the_protocol(capsys):
    from flatfast.__main__ import main
    import flatfast.experiments

    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    assert "docs/guide/protocol.md" in capsys.readouterr().out
    assert "docs/guide/protocol.md" in flatfast.experiments.__doc__
    assert "shared" not in flatfast.experiments.__doc__


def test_quick_help_names_every_value_it_changes(capsys):
    from flatfast.__main__ import main
    from flatfast.experiments import Config
    from flatfast.experiments import TemporalConfig

    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.index("a reduced run")
    quick = text[start:text.index("--data", start)]
    changed = {}
    for full, reduced in ((Config(), Config.quick()), (TemporalConfig(), TemporalConfig.quick()),
                          (Config(arch="cnn"), Config.quick(arch="cnn"))):
        for field in dataclasses.fields(full):
            if getattr(full, field.name) != getattr(reduced, field.name):
                changed[field.name] = getattr(reduced, field.name)
    assert changed  # the reduced run changes something
    for name, value in changed.items():
        shown = _as_text(value) if not isinstance(value, float) else f"{value:.0%}".replace("%", " %")
        assert shown in quick, (name, shown, quick)
