"""How the store writes a value as JSON and reads it back (results, summaries, configs)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


def _default(obj: Any) -> Any:
    # Analysis results are frozen dataclasses and configs may hold paths; both have an obvious
    # JSON form, anything else is a bug in the caller and should fail loudly.
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} as JSON: {obj!r}")


def dumps(value: Any) -> str:
    # allow_nan (the default) keeps NaN/inf in results (an untestable std, a diverged loss):
    # the output is not strict JSON but json.loads reads it back exactly.
    return json.dumps(value, default=_default, sort_keys=True)


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)
