"""Errors a user can cause. The CLI prints them as one line each and exits with code 2."""

from __future__ import annotations

from collections.abc import Sequence


class UserError(Exception):
    """A problem the user can fix (bad spec, missing data, impossible budget).

    Rendered as ``file:line field: message`` where those are known, so the user can jump to it.
    One mistake can break several fields (a misspelt section is an unknown field *and* a
    missing one): ``more`` carries the others, each with its own place, so the user sees them
    all at once instead of one per attempt; ``omitted`` counts those left out past a cap.
    Bugs are ordinary exceptions and keep their traceback.
    """

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None, more: Sequence[UserError] = (),
                 omitted: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        self.more = list(more)
        self.omitted = omitted

    def where(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}" if self.line else self.file
        if self.field:
            where = f"{where} {self.field}" if where else self.field
        return where

    def lines(self) -> list[str]:
        """One line per error, this one first."""
        where = self.where()
        out = [f"{where}: {self.message}" if where else self.message]
        out += [line for e in self.more for line in e.lines()]
        if self.omitted:
            out.append(f"... and {self.omitted} more error{'s' if self.omitted > 1 else ''} "
                       "(fix these first)")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())
