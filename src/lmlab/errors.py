"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad spec, missing data, impossible budget).

    Rendered as ``file:line field: message`` where those are known, so the user can jump to it.
    Bugs are ordinary exceptions and keep their traceback.
    """

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.field = field

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}" if self.line else self.file
        if self.field:
            where = f"{where} {self.field}" if where else self.field
        return f"{where}: {self.message}" if where else self.message
