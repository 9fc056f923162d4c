"""Reading YAML the way operators mean it, keeping where every value came from.

PyYAML follows YAML 1.1, where `on`, `no` and `2024-06-01` silently become booleans and
dates. Here only `true`/`false` are booleans, only plain numerals are numbers, everything
else is a string; duplicate keys are errors; unsafe tags, huge files and anchor bombs are
refused. Each value's position is kept in `YamlDoc.marks`, keyed by its path
(`("rules", 0, "when")`), so diagnostics can say file:line:col.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.errors import InputError

MAX_BYTES = 1_000_000
MAX_NODES = 100_000
_INT = re.compile(r"^[-+]?(0|[1-9][0-9_]*)$")
_FLOAT = re.compile(r"^[-+]?(\d[\d_]*)?\.\d+([eE][-+]?\d+)?$|^[-+]?\d[\d_]*[eE][-+]?\d+$")

Path_ = tuple[str | int, ...]


class YamlError(InputError):
    """A YAML file cannot be read or parsed; carries the position of the problem."""

    def __init__(self, file: str, line: int, col: int, message: str, excerpt: str = "") -> None:
        self.file, self.line, self.col, self.message, self.excerpt = (
            file,
            line,
            col,
            message,
            excerpt,
        )
        where = f"{file}:{line}:{col}" if line else file
        super().__init__(f"{where}: {message}{excerpt}")


@dataclass(frozen=True)
class YamlProblem:
    """A problem that does not stop the document from being read (a duplicate key)."""

    line: int
    col: int
    message: str


@dataclass(frozen=True)
class Mark:
    """A 1-based line and column in a file."""

    line: int
    col: int


@dataclass
class YamlDoc:
    """A parsed YAML document: the plain data plus where each value started."""

    file: str
    data: Any
    marks: dict[Path_, Mark] = field(default_factory=dict)
    key_marks: dict[Path_, Mark] = field(default_factory=dict)
    styles: dict[Path_, str] = field(default_factory=dict)
    problems: list[YamlProblem] = field(default_factory=list)
    lines: list[str] = field(default_factory=list, repr=False)

    def mark(self, path: Path_) -> Mark:
        """The position of `path`, or of its nearest ancestor that has one."""
        while path:
            if path in self.marks:
                return self.marks[path]
            path = path[:-1]
        return self.marks.get((), Mark(1, 1))

    def key_mark(self, path: Path_) -> Mark:
        """The position of the key that names `path` (falls back to `mark`)."""
        return self.key_marks.get(path) or self.mark(path)

    def mark_in_string(self, path: Path_, offset: int) -> Mark:
        """The position in the file of character `offset` of the string value at `path`.

        Exact for plain, quoted, literal (|) and folded (>) strings, on one line or
        several; inside double quotes, escape sequences before the offset shift it.
        """
        start = self.mark(path)
        style = self.styles.get(path, "")
        value: Any = self.data
        for part in path:
            value = value[part]
        if not isinstance(value, str) or not self.lines:
            return start
        if style == "|":
            return self._in_literal(start, value, offset)
        first = start.line - 1 if style != ">" else start.line
        pos = 0
        for index in range(first, len(self.lines)):
            line = self.lines[index]
            begin = (
                start.col - 1 + (1 if style in ("'", '"') else 0)
                if index == start.line - 1
                else (len(line) - len(line.lstrip()))
            )
            segment = line[begin:].rstrip()
            if style in ("'", '"') and segment.endswith(style):
                segment = segment[:-1]
            if offset <= pos + len(segment) or index == len(self.lines) - 1:
                return Mark(index + 1, begin + (offset - pos) + 1)
            pos += len(segment) + 1  # folded lines join with one space
        return start

    def _in_literal(self, start: Mark, value: str, offset: int) -> Mark:
        before = value[:offset].split("\n")
        line_index = start.line + len(before) - 1  # content starts on the line after "|"
        if line_index >= len(self.lines):
            return start
        content = [ln for ln in self.lines[start.line :] if ln.strip()]
        indent = len(content[0]) - len(content[0].lstrip()) if content else 0
        return Mark(line_index + 1, indent + len(before[-1]) + 1)


def load_yaml_file(path: str | Path) -> YamlDoc:
    """Read and parse a YAML file, raising InputError with file:line:col on any problem."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise YamlError(name, 0, 0, f"cannot read: {exc.strerror or exc}") from exc
    if len(raw) > MAX_BYTES:
        raise YamlError(name, 0, 0, f"file is {len(raw):,} bytes; the limit is {MAX_BYTES:,}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise YamlError(name, line, 1, f"not UTF-8 text (byte {exc.start})") from exc
    return load_yaml_text(text, name)


def load_yaml_text(text: str, name: str = "<string>") -> YamlDoc:
    """Parse YAML text (see the module docstring for the rules)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(name, text, exc) from exc
    except yaml.YAMLError as exc:
        raise YamlError(name, 1, 1, f"invalid YAML: {exc}") from exc
    except RecursionError as exc:
        raise YamlError(name, 1, 1, "the document is nested too deeply") from exc
    doc = YamlDoc(file=name, data=None, lines=text.splitlines())
    if node is None:
        return doc
    builder = _Builder(doc, name)
    doc.data = builder.build(node, ())
    return doc


class _Builder:
    def __init__(self, doc: YamlDoc, name: str) -> None:
        self.doc = doc
        self.name = name
        self.nodes = 0

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise YamlError(
                self.name,
                node.start_mark.line + 1,
                node.start_mark.column + 1,
                f"the document expands to over {MAX_NODES:,} values "
                "(anchors/aliases repeated too often?)",
            )
        mark = Mark(node.start_mark.line + 1, node.start_mark.column + 1)
        self.doc.marks[path] = mark
        if isinstance(node, yaml.MappingNode):
            self._check_tag(node, mark, _MAP_TAGS)
            result: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key_mark = Mark(key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise YamlError(
                        self.name,
                        key_mark.line,
                        key_mark.col,
                        "merge keys (<<) are not supported; write the keys out",
                    )
                if not isinstance(key_node, yaml.ScalarNode):
                    raise YamlError(
                        self.name, key_mark.line, key_mark.col, "mapping keys must be plain text"
                    )
                key = str(key_node.value)
                if key in result:
                    first = self.doc.key_marks[(*path, key)]
                    self.doc.problems.append(
                        YamlProblem(
                            key_mark.line,
                            key_mark.col,
                            f"duplicate key {key!r} (first at line {first.line})",
                        )
                    )
                    continue
                self.doc.key_marks[(*path, key)] = key_mark
                result[key] = self.build(value_node, (*path, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            self._check_tag(node, mark, _SEQ_TAGS)
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        self._check_tag(node, mark, _SCALAR_TAGS)
        if node.style:
            self.doc.styles[path] = node.style
        return _scalar(node)

    def _check_tag(self, node: yaml.Node, mark: Mark, allowed: frozenset[str]) -> None:
        if node.tag not in allowed:
            raise YamlError(
                self.name,
                mark.line,
                mark.col,
                f"tag {node.tag!r} is not allowed (playbooks are plain data)",
            )


_CORE = "tag:yaml.org,2002:"
_MAP_TAGS = frozenset({_CORE + "map"})
_SEQ_TAGS = frozenset({_CORE + "seq"})
_SCALAR_TAGS = frozenset(_CORE + t for t in ("str", "int", "float", "bool", "null", "timestamp"))


def _scalar(node: yaml.ScalarNode) -> Any:
    value = str(node.value)
    if node.tag == _CORE + "str" or node.style in ("'", '"', "|", ">"):
        return value
    if value in ("true", "false"):
        return value == "true"
    if value in ("null", "~", ""):
        return None
    if _INT.match(value):
        return int(value.replace("_", ""))
    if _FLOAT.match(value):
        return float(value.replace("_", ""))
    return value


def _syntax_error(name: str, text: str, exc: yaml.MarkedYAMLError) -> YamlError:
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or exc.context or "invalid YAML"
    if mark is None:
        return YamlError(name, 1, 1, f"invalid YAML: {problem}")
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    excerpt = f"\n  {line}\n  {' ' * mark.column}^"
    return YamlError(name, mark.line + 1, mark.column + 1, f"invalid YAML: {problem}", excerpt)
