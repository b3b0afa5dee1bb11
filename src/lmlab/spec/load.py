"""YAML in, typed config out, with every error pointing at a file, a line and a field.

``load_yaml`` keeps a map from dotted field paths to the line they were written on, so a pydantic
validation error deep in the tree becomes ``spec.yaml:14 independent.arms.big.lr: ...``.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from lmlab.config import LEGACY_CADENCE_KEYS, Components
from lmlab.errors import UserError

if TYPE_CHECKING:
    from lmlab.spec.baseline import Inheritance

M = TypeVar("M", bound=BaseModel)


@dataclass
class YamlDoc:
    path: Path
    data: Any
    lines: dict[str, int]  # "a.b.0.c" -> 1-based line number
    # A spec that extends a baseline (``controlled: {extends: PATH}``): the baseline file's
    # document (values this one does not write come from it, and so do errors about them) and
    # what was inherited (:mod:`lmlab.spec.baseline`).
    inherited: YamlDoc | None = None
    extends: Inheritance | None = None

    def _depth(self, field: str) -> int:
        """How many parts of ``field`` this document wrote (its deepest written ancestor)."""
        parts = field.split(".") if field else []
        while parts and ".".join(parts) not in self.lines:
            parts.pop()
        return len(parts)

    def where(self, field: str) -> tuple[Path, int | None]:
        """The file and line a value at ``field`` came from: this document's, or the
        baseline's when the baseline wrote it more precisely (an inherited value; a tie is an
        override, written here)."""
        if self.inherited is not None and self.inherited._depth(field) > self._depth(field):
            return self.inherited.where(field)
        return self.path, self.line_of(field)

    def line_of(self, field: str) -> int | None:
        """The line of ``field`` or of its nearest written ancestor."""
        parts = field.split(".") if field else []
        while parts:
            key = ".".join(parts)
            if key in self.lines:
                return self.lines[key]
            parts.pop()
        return self.lines.get("", 1)

    def error(self, field: str, message: str) -> UserError:
        path, line = self.where(field)
        return UserError(message, file=str(path), line=line, field=field or None)

    @contextmanager
    def located(self, components_under: str = "") -> Iterator[None]:
        """Give a UserError raised deeper down (data, tokenizer, model loading) this document's
        file and the line of its field (a RunConfig path). A spec writes the run's component
        sections (data, ..., train) under ``controlled``: ``components_under`` says so."""
        try:
            yield
        except UserError as e:
            if e.file is None:
                field = e.field or ""
                if components_under and field.split(".", 1)[0] in Components.model_fields:
                    field = f"{components_under}.{field}"
                path, e.line = self.where(field)
                e.file, e.field = str(path), field or None
            raise

    def move(self, src: str, dst: str) -> bool:
        """Move the value at dotted ``src`` to ``dst`` (merging into a mapping already there),
        lines included; returns whether there was anything to move."""
        *parents, leaf = src.split(".")
        node = self.data
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                return False
        if not isinstance(node, dict) or leaf not in node:
            return False
        value = node.pop(leaf)
        *dst_parents, dst_leaf = dst.split(".")
        target = self.data
        for key in dst_parents:
            target = target.setdefault(key, {})
        if isinstance(value, dict) and isinstance(target.get(dst_leaf), dict):
            target[dst_leaf] = {**value, **target[dst_leaf]}
        else:
            target[dst_leaf] = value
        for key in [k for k in self.lines if k == src or k.startswith(src + ".")]:
            self.lines.setdefault(dst + key[len(src):], self.lines[key])
        for i in range(1, len(dst_parents) + 1):
            self.lines.setdefault(".".join(dst_parents[:i]), self.lines[src])
        return True


def _walk(node: yaml.Node, prefix: str, lines: dict[str, int], doc_path: Path) -> None:
    lines.setdefault(prefix, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                raise UserError(f"duplicate key '{key}'", file=str(doc_path),
                                line=key_node.start_mark.line + 1, field=f"{prefix}.{key}".strip("."))
            seen.add(key)
            path = f"{prefix}.{key}" if prefix else key
            lines[path] = key_node.start_mark.line + 1
            _walk(value_node, path, lines, doc_path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}.{i}" if prefix else str(i)
            lines[path] = item.start_mark.line + 1
            _walk(item, path, lines, doc_path)


# A spec or config file is a few kilobytes of text. These bounds refuse what is not one, in
# milliseconds: a binary file, or an alias "bomb" (anchors referencing anchors: a few hundred
# bytes that expand to billions of values once anything walks them).
MAX_BYTES = 1 << 20
MAX_VALUES = 100_000


def load_yaml(path: Path | str) -> YamlDoc:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise UserError("file not found", file=str(path)) from None
    except OSError as e:
        raise UserError(f"cannot read: {e.strerror}", file=str(path)) from None
    if len(raw) > MAX_BYTES:
        raise UserError(f"more than {MAX_BYTES >> 20} MiB: not a spec or config file",
                        file=str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"not UTF-8 text (byte {e.start}): a spec or config file is YAML text",
                        file=str(path), line=line) from None
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as e:  # a control character: binary data in a UTF-8 file
        raise UserError(f"not YAML text: character {e.character:#06x} is not allowed",
                        file=str(path), line=text[:e.position].count("\n") + 1) from None
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_size(node, path)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise UserError(f"YAML syntax error: {e.problem or e}", file=str(path), line=line) from None
    except RecursionError:  # the parser recurses per level of nesting
        raise UserError("nested too deeply: not a spec or config file", file=str(path)) from None
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    if node is not None:
        _walk(node, "", lines, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError("expected a mapping of sections at the top level", file=str(path), line=1)
    return YamlDoc(path=path, data=data, lines=lines)


def _check_size(root: yaml.Node, path: Path) -> None:
    """Refuse a document whose aliases expand to more than ``MAX_VALUES`` values, or refer to
    themselves. Each node's expanded size is computed once (the graph is small even when what
    it expands to is not), so this takes time in the document's length, not its expansion."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def expanded(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise UserError("a YAML alias refers to itself", file=str(path),
                            line=node.start_mark.line + 1)
        open_nodes.add(key)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        total = 1
        for child in children:
            total += expanded(child)
            if total > MAX_VALUES:
                raise UserError(f"its aliases expand to more than {MAX_VALUES:,} values: not a "
                                "spec or config file", file=str(path),
                                line=node.start_mark.line + 1)
        open_nodes.discard(key)
        sizes[key] = total
        return total

    expanded(root)


# -- documents written for lmlab 0.1 --------------------------------------------------------------
# 0.1 kept the log and checkpoint cadences in the evaluation section, and a run config file named
# its evaluation section ``eval`` with ``diagnostics`` beside it. Such files are moved to today's
# sections as they are read, so every error still points at the line the user wrote.

def upgrade_spec_doc(doc: YamlDoc) -> YamlDoc:
    for key in LEGACY_CADENCE_KEYS:
        doc.move(f"evaluation.{key}", f"cadence.{key}")
    return doc


def upgrade_run_doc(doc: YamlDoc) -> YamlDoc:
    """A ``lmlab train`` config file."""
    for key in LEGACY_CADENCE_KEYS:
        doc.move(f"eval.{key}", f"cadence.{key}")
    doc.move("eval", "evaluation")
    doc.move("diagnostics", "evaluation.diagnostics")
    return upgrade_spec_doc(doc)


# However many fields a document gets wrong, this many are shown, each with its line; the rest
# are counted. A dozen covers a pasted section in the wrong place without flooding the terminal.
MAX_ERRORS = 12


def _describe(err: dict[str, Any], known: list[str]) -> str:
    kind, msg = err.get("type", ""), err.get("msg", "invalid value")
    value = err.get("input")
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1, cutoff=0.6)
        return f"unknown field (did you mean '{close[0]}'?)" if close else "unknown field"
    if kind == "missing":
        return "required field is missing"
    if kind.endswith("_parsing") or kind.endswith("_type"):
        return f"{msg[0].lower()}{msg[1:]}, got {value!r}"
    return msg.removeprefix("Value error, ")


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """The field names a document may write at ``loc`` inside ``model`` (for "did you mean"),
    or none where the schema there is not a plain model."""
    node: Any = model
    for part in loc:
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or \
                part not in node.model_fields:
            return []
        annotation = node.model_fields[part].annotation
        models = [a for a in (typing.get_args(annotation) or (annotation,))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        node = models[0] if models else None
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


def validate(doc: YamlDoc, model: type[M], data: Any = None, prefix: str = "") -> M:
    """Build ``model`` from ``data`` (default: the whole document). Every error becomes a
    UserError line with the file, line and dotted field of the offending value, in the order
    of the document (up to MAX_ERRORS; the rest are counted)."""
    try:
        return model.model_validate(doc.data if data is None else data)
    except ValidationError as e:
        found: dict[str, UserError] = {}
        for err in e.errors():
            # Drop pydantic's union/tag segments (they are not fields a user wrote).
            loc = [str(p) for p in err["loc"]
                   if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
            # A check across fields (config.about) names them: point at the first one's line.
            loc += (err.get("ctx") or {}).get("fields", ())[:1]
            field = ".".join(([prefix] if prefix else []) + loc)
            # A value that fails every member of a union fails once for each: say it once.
            if field not in found:
                found[field] = doc.error(field, _describe(err, _fields_at(model, loc[:-1])))
        ordered = sorted(found.values(), key=lambda u: u.line or 0)
        first, *rest = ordered
        first.more = rest[:MAX_ERRORS - 1]
        first.omitted = len(rest) - len(first.more)
        raise first from None
