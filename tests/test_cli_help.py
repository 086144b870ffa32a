"""Every `veil` command explains itself (`--help`, with help text for every option), and `veil list` shows
every registered defense, task and server model."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from veil.cli import app
from veil.data import list_tasks
from veil.defenses import defense_class, list_defenses
from veil.models import list_models

runner = CliRunner()
COMMANDS = sorted(typer.main.get_command(app).commands)


def test_every_command_is_listed_by_top_level_help():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    assert len(COMMANDS) >= 8
    for name in COMMANDS:
        assert name in r.output


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help_explains_every_option(name):
    command = typer.main.get_command(app).commands[name]
    assert (command.help or "").strip(), f"'veil {name}' has no description"
    for param in command.params:
        if getattr(param, "param_type_name", "") == "option" and "--help" not in param.opts:
            assert (param.help or "").strip(), f"'veil {name}' option {param.opts} has no help text"
    r = runner.invoke(app, [name, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output and "Traceback" not in r.output


def test_list_shows_every_defense_task_and_model():
    r = runner.invoke(app, ["list"], terminal_width=250)
    assert r.exit_code == 0, r.output
    for name in list_defenses():
        assert name in r.output
        knob = defense_class(name).knob
        if knob:
            assert knob in r.output
    for name in [*list_tasks(), *list_models()]:
        assert name in r.output
