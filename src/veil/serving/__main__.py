"""``python -m veil.serving RUN [options]``: ``veil serve`` without importing the other commands (a faster
start, for process managers and tests)."""

import typer

from veil.serving.commands import serve_cmd

if __name__ == "__main__":
    typer.run(serve_cmd)
