"""Pieces every CLI command module shares: one error line with exit code 2, and ``--option`` parsing."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, List, Optional

import typer
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)


def fail(err: Exception) -> None:
    """Print one line naming the problem (no traceback) and exit with code 2.

    The message is printed as plain text (a path such as ``data[a].npz`` is not read as markup) and on
    one line (line breaks in a library's message are joined)."""
    from rich.text import Text

    console.print(Text.assemble(("error:", "bold red"), " ", " ".join(str(err).split())))
    raise typer.Exit(2)


def parse_options(items: Optional[List[str]]) -> dict:
    """``["k=1", "name=adaptive"]`` -> ``{"k": 1, "name": "adaptive"}`` (values parsed as JSON when they can be)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--option takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if not key.strip():
            raise ValueError(f"--option takes KEY=VALUE with a non-empty KEY, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if isinstance(parsed, float) and not math.isfinite(parsed):
            raise ValueError(f"--option {key}: value must be a finite number, got {value!r}")
        if key in out:
            raise ValueError(f"--option {key} given twice")
        out[key] = parsed
    return out


def config_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of the config dataclass ``cls`` (the one place it is written)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise ValueError(f"{cls.__name__} has no field {name!r}")
    f = fields[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise ValueError(f"{cls.__name__}.{name} has no default")


def config_option(cls: type, name: str, *flags: str, **kwargs: Any) -> Any:
    """A ``typer.Option`` whose default is ``cls``'s default for field ``name`` (never restated in the CLI).

    ``flags`` default to ``--name-with-dashes``; ``kwargs`` go to ``typer.Option`` (``help``, ``min``, ...).
    """
    return typer.Option(config_default(cls, name), *(flags or ("--" + name.replace("_", "-"),)), **kwargs)
