"""The one exception type for user mistakes.

A `UserError` carries a single line that names the file, the field (or line) and what was expected.
Entry points catch it, print ``error: <message>`` to stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn


class UserError(Exception):
    """A problem with the user's input: config, data, paths or earlier runs. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


def nearest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest of `choices`, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def read_json(path: Path) -> Any:
    """A JSON file's value; a file that is not valid JSON is one line naming it and the line of the fault."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None


def fail(message: str, exit_code: int = UserError.exit_code) -> NoReturn:
    """Print one line to stderr and exit (2 unless told otherwise). Under a launcher only rank 0 prints it: every
    rank reads the same inputs and meets the same error, which the user needs once, not once per rank."""
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(exit_code)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Run a command-line `main`, turning a UserError into one line and exit code 2."""
    try:
        code = main(argv)
    except UserError as err:
        fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code or 0)
