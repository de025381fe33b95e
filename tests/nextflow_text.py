"""Reading the pipeline's Nextflow sources from Python, for tests/test_nextflow.py.

reftrace parses the .nf and .config files (syntax, processes, directives); it does not give a
process's script text or a config closure's value. This module reads those parts and evaluates
the small subset of Groovy expressions that the pipeline's scripts and ``ext.args`` closures
use (strings with ``${...}``, property access, ``?:``, ``? :``, comparisons, arithmetic,
``as Integer``, ``Math.max``, ``intdiv``), so that a test can render each process's command line
exactly as Nextflow would and hand it to the real ``bmseg`` argument parser. Anything outside
that subset raises :class:`GroovySubsetError`, so a script the tests cannot render fails loudly
instead of being skipped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class GroovySubsetError(ValueError):
    """The text uses Groovy beyond the subset this module evaluates, or is malformed."""


class PathList(list):
    """A list of staged file names: Nextflow renders it blank-separated inside a script."""

    def __str__(self) -> str:
        return " ".join(str(item) for item in self)


def skip_string(src: str, i: int) -> int:
    """Index just past the string literal (any Groovy quoting) that starts at ``src[i]``."""
    for quote in ('"""', "'''", '"', "'"):
        if src.startswith(quote, i):
            break
    else:
        raise GroovySubsetError(f"no string literal at offset {i}")
    j = i + len(quote)
    while j < len(src):
        if src[j] == "\\":
            j += 2
            continue
        if src.startswith(quote, j):
            return j + len(quote)
        if quote[0] == '"' and src.startswith("${", j):
            j = matching_brace(src, j + 1) + 1
            continue
        j += 1
    raise GroovySubsetError(f"unterminated string starting at offset {i}")


def matching_brace(src: str, i: int) -> int:
    """Index of the ``}`` that closes the ``{`` at ``src[i]``, skipping strings and comments."""
    if src[i] != "{":
        raise GroovySubsetError(f"no '{{' at offset {i}")
    depth = 0
    j = i
    while j < len(src):
        char = src[j]
        if src.startswith("//", j):
            j = src.find("\n", j)
            j = len(src) if j < 0 else j
            continue
        if src.startswith("/*", j):
            j = src.index("*/", j) + 2
            continue
        if char in "'\"":
            j = skip_string(src, j)
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    raise GroovySubsetError(f"unbalanced '{{' at offset {i}")


def strip_comments(src: str) -> str:
    """``src`` with ``//`` and ``/* */`` comments blanked out (strings left intact)."""
    out = []
    j = 0
    while j < len(src):
        if src.startswith("//", j):
            end = src.find("\n", j)
            j = len(src) if end < 0 else end
            continue
        if src.startswith("/*", j):
            end = src.index("*/", j) + 2
            out.append("\n" * src.count("\n", j, end))
            j = end
            continue
        if src[j] in "'\"":
            end = skip_string(src, j)
            out.append(src[j:end])
            j = end
            continue
        out.append(src[j])
        j += 1
    return "".join(out)


def named_blocks(src: str, header: str) -> dict[str, str]:
    """Bodies of the blocks ``<header> NAME {...}`` in ``src`` (comments removed), by NAME.

    ``header`` is a regular expression such as ``process\\s+(\\w+)`` or
    ``withName:\\s*'([^']+)'``; its first group is the name.
    """
    src = strip_comments(src)
    blocks = {}
    for match in re.finditer(header + r"\s*\{", src):
        start = match.end() - 1
        blocks[match.group(1)] = src[start + 1 : matching_brace(src, start)]
    return blocks


def sections(process_body: str) -> dict[str, str]:
    """A process body split at its section labels (``input:``, ``script:``, ...), by label."""
    labels = ("input", "output", "when", "script", "stub", "exec", "shell")
    pattern = re.compile(r"^\s*(" + "|".join(labels) + r"):\s*$", re.MULTILINE)
    found = list(pattern.finditer(process_body))
    parts = {"directives": process_body[: found[0].start()] if found else process_body}
    for index, match in enumerate(found):
        end = found[index + 1].start() if index + 1 < len(found) else len(process_body)
        parts[match.group(1)] = process_body[match.end() : end]
    return parts


def assignments(block: str) -> dict[str, str]:
    """Top-level ``name = value`` assignments of a config block body, value text by name."""
    block = strip_comments(block)
    result = {}
    for match in re.finditer(r"^[ \t]*([\w.]+)[ \t]*=[ \t]*", block, re.MULTILINE):
        start = match.end()
        end = _expression_end(block, start)
        result[match.group(1)] = block[start:end].strip()
    return result


def _expression_end(src: str, i: int) -> int:
    """End of the expression starting at ``src[i]``: the end of its line, brackets balanced."""
    depth = 0
    j = i
    while j < len(src):
        char = src[j]
        if char in "'\"":
            j = skip_string(src, j)
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth < 0:
                return j
        elif char == "\n" and depth == 0:
            return j
        j += 1
    return j


# --- evaluation -------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<number>\d+\.\d+|\d+)
      | (?P<name>[A-Za-z_]\w*)
      | (?P<op>\?:|\?\.|\.\.|\*\*|==|!=|<=|>=|&&|\|\||->|[-+*/%<>!?:.,()\[\]{}=])
    )""",
    re.VERBOSE,
)


@dataclass
class _Lambda:
    """A Groovy closure ``{ a, b -> expr }`` with the expression kept as source."""

    params: list[str]
    body: str
    scope: dict[str, Any]

    def __call__(self, *args: Any) -> Any:
        scope = dict(self.scope)
        names = self.params or ["it"]
        if len(args) == 1 and len(names) > 1 and isinstance(args[0], list):
            args = tuple(args[0])  # Groovy spreads a list over several closure parameters
        scope.update(zip(names, args, strict=False))
        return evaluate(self.body, scope)


def groovy_str(value: Any) -> str:
    """``value`` as Groovy renders it inside a GString."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, PathList):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(groovy_str(item) for item in value) + "]"
    return str(value)


def truthy(value: Any) -> bool:
    """Groovy truth: null, false, 0, '' and empty collections are false."""
    return bool(value)


_METHODS: dict[str, Callable[..., Any]] = {
    "intdiv": lambda a, b: int(a) // int(b),
    "join": lambda items, sep="": sep.join(groovy_str(item) for item in items),
    "collect": lambda items, fn: [fn(item) for item in items],
    "findAll": lambda items, fn: [item for item in items if truthy(fn(item))],
    "transpose": lambda lists: [list(row) for row in zip(*lists, strict=True)],
    "tokenize": lambda text, separators: [
        t for t in re.split(f"[{re.escape(separators)}]", text) if t
    ],
    "size": len,
    # java.lang.String, as far as the scripts use it
    "toLowerCase": lambda text: text.lower(),
    "endsWith": lambda text, suffix: text.endswith(suffix),
    "lastIndexOf": lambda text, part: text.rfind(part),
    "length": len,
    "substring": lambda text, start, end=None: text[start:end],
    "replaceAll": lambda text, pattern, replacement: re.sub(pattern, replacement, text),
    "replaceFirst": lambda text, pattern, replacement: re.sub(pattern, replacement, text, count=1),
    "matches": lambda text, pattern: re.fullmatch(pattern, text) is not None,
}

_CASTS: dict[str, Callable[[Any], Any]] = {"Integer": int}

# Nextflow's memory and duration units as numbers: bytes and seconds.
UNITS = {"MB": 1024**2, "GB": 1024**3, "TB": 1024**4, "min": 60, "h": 3600, "d": 86400}


class _Parser:
    """Recursive-descent evaluator over one expression's source text."""

    def __init__(self, src: str, scope: dict[str, Any]) -> None:
        self.src = src
        self.pos = 0
        self.scope = scope

    # lexing
    def _peek(self) -> tuple[str, str]:
        rest = self.src[self.pos :]
        stripped = rest.lstrip()
        if not stripped:
            return ("end", "")
        if stripped[0] in "'\"":
            return ("string", stripped[0])
        match = _TOKEN.match(rest)
        if not match:
            raise GroovySubsetError(f"cannot read {stripped[:30]!r}")
        kind = match.lastgroup or "op"
        return (kind, match.group(kind))

    def _take(self) -> tuple[str, str]:
        kind, text = self._peek()
        if kind == "string":
            raise GroovySubsetError("internal: string taken as token")
        match = _TOKEN.match(self.src, self.pos)
        assert match is not None
        self.pos = match.end()
        return kind, text

    def _expect(self, text: str) -> None:
        got = self._take()[1]
        if got != text:
            raise GroovySubsetError(f"expected {text!r}, found {got!r} in {self.src!r}")

    def _at(self, text: str) -> bool:
        return self._peek()[1] == text and self._peek()[0] != "string"

    # grammar
    def statements(self) -> Any:
        """``def name = expr`` statements, then a final expression whose value is returned."""
        value = None
        while self._peek()[0] != "end":
            if self._peek() == ("name", "return"):
                self._take()
                value = self.expression()
                break
            if self._peek() == ("name", "def"):
                self._take()
                name = self._take()[1]
                if self._at("("):
                    raise GroovySubsetError(f"function definition {name}() inside an expression")
                self._expect("=")
                self.scope[name] = self.expression()
            else:
                value = self.expression()
        return value

    def expression(self) -> Any:
        condition = self.or_expr()
        if self._at("?:"):
            self._take()
            fallback = self.expression()
            return condition if truthy(condition) else fallback
        if self._at("?"):
            self._take()
            when_true = self.expression()
            self._expect(":")
            when_false = self.expression()
            return when_true if truthy(condition) else when_false
        return condition

    def or_expr(self) -> Any:
        return self._logical("||", self.and_expr)

    def and_expr(self) -> Any:
        return self._logical("&&", self.comparison)

    def _logical(self, op: str, operand: Callable[[], Any]) -> Any:
        """``operand op operand ...`` for ``||`` or ``&&``, left to right, as a boolean."""
        value = operand()
        while self._at(op):
            self._take()
            right = truthy(operand())
            value = (truthy(value) or right) if op == "||" else (truthy(value) and right)
        return value

    def comparison(self) -> Any:
        value = self.range()
        ops = {
            "==": lambda a, b: a == b,
            "!=": lambda a, b: a != b,
            "<": lambda a, b: a < b,
            ">": lambda a, b: a > b,
            "<=": lambda a, b: a <= b,
            ">=": lambda a, b: a >= b,
        }
        if self._peek()[0] == "op" and self._peek()[1] in ops:
            op = self._take()[1]
            return ops[op](value, self.range())
        if self._peek() == ("name", "in"):
            self._take()
            return value in self.range()
        return value

    def range(self) -> Any:
        value = self.additive()
        if self._at(".."):
            self._take()
            return list(range(value, self.additive() + 1))
        return value

    def additive(self) -> Any:
        value = self.multiplicative()
        while self._peek()[0] == "op" and self._peek()[1] in "+-":
            op = self._take()[1]
            right = self.multiplicative()
            if op == "+" and isinstance(value, str):
                value = groovy_str(value) + groovy_str(right)
            elif op == "+" and isinstance(value, list):
                value = value + (right if isinstance(right, list) else [right])
            elif op == "+":
                value = value + right
            else:
                value = value - right
        return value

    def multiplicative(self) -> Any:
        value = self.cast()
        while self._peek()[0] == "op" and self._peek()[1] in ("*", "/", "%", "**"):
            op = self._take()[1]
            right = self.cast()
            if op == "**":
                value = value**right
            elif op == "*":
                value = value * right
            elif op == "/":
                value = value / right
            else:
                value = value % right
        return value

    def cast(self) -> Any:
        value = self.unary()
        while self._peek() == ("name", "as"):
            self._take()
            type_name = self._take()[1]
            if type_name not in _CASTS:
                raise GroovySubsetError(f"cast to {type_name} is outside the subset")
            value = _CASTS[type_name](value)
        return value

    def unary(self) -> Any:
        if self._at("!"):
            self._take()
            return not truthy(self.unary())
        if self._at("-"):
            self._take()
            return -self.unary()
        return self.postfix()

    def postfix(self) -> Any:
        value = self.primary()
        while True:
            if self._at(".") or self._at("?."):
                safe = self._take()[1] == "?."
                name = self._take()[1]
                if self._at("(") or self._at("{"):
                    args = self._arguments() if self._at("(") else []
                    if self._at("{"):  # a trailing closure argument: items.collect { x -> ... }
                        self._take()
                        args.append(self._closure())
                    if safe and value is None:
                        continue
                    value = self._call_method(value, name, args)
                elif safe and value is None:
                    continue
                else:
                    value = self._property(value, name)
            elif self._at("["):
                self._take()
                index = self.expression()
                self._expect("]")
                value = value[index]
            else:
                return value

    def _arguments(self) -> list[Any]:
        self._expect("(")
        args = []
        while not self._at(")"):
            args.append(self.expression())
            if self._at(","):
                self._take()
        self._expect(")")
        return args

    @staticmethod
    def _property(value: Any, name: str) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name in UNITS:
            return value * UNITS[name]  # 6.GB, 4.h: bytes and seconds
        if isinstance(value, dict):
            if name not in value:
                raise GroovySubsetError(f"no sample value for property {name!r}")
            return value[name]
        kind = type(value).__name__
        raise GroovySubsetError(f"property {name!r} of {kind} is outside the subset")

    @staticmethod
    def _call_method(value: Any, name: str, args: list[Any]) -> Any:
        if isinstance(value, _MathNamespace):
            return getattr(math_namespace, name)(*args)
        if name not in _METHODS:
            raise GroovySubsetError(f"method {name}() is outside the subset")
        return _METHODS[name](value, *args)

    def primary(self) -> Any:
        kind, text = self._peek()
        if kind == "string":
            return self._string()
        if kind == "end":
            raise GroovySubsetError(f"expression ends early in {self.src!r}")
        self._take()
        if kind == "number":
            return float(text) if "." in text else int(text)
        if kind == "name":
            if text in ("true", "false"):
                return text == "true"
            if text == "null":
                return None
            if text in ("Math", "System"):
                return math_namespace
            if self._at("("):
                raise GroovySubsetError(f"function {text}() is outside the subset")
            if text not in self.scope:
                raise GroovySubsetError(f"no sample value for {text!r}")
            return self.scope[text]
        if text == "(":
            value = self.expression()
            self._expect(")")
            return value
        if text == "[":
            items = []
            while not self._at("]"):
                items.append(self.expression())
                if self._at(","):
                    self._take()
            self._expect("]")
            return items
        if text == "{":
            return self._closure()
        raise GroovySubsetError(f"unexpected {text!r} in {self.src!r}")

    def _closure(self) -> _Lambda:
        start = self.pos - 1
        end = matching_brace(self.src, start)
        body = self.src[start + 1 : end]
        self.pos = end + 1
        params: list[str] = []
        arrow = re.match(r"\s*([\w\s,]*?)\s*->", body)
        if arrow:
            params = [name.strip() for name in arrow.group(1).split(",") if name.strip()]
            body = body[arrow.end() :]
        return _Lambda(params, body, self.scope)

    def _string(self) -> str:
        start = len(self.src) - len(self.src[self.pos :].lstrip())
        end = skip_string(self.src, start)
        self.pos = end
        literal = self.src[start:end]
        quote = next(q for q in ('"""', "'''", '"', "'") if literal.startswith(q))
        inner = literal[len(quote) : -len(quote)]
        if quote[0] == "'":
            return _unescape(inner)
        return self._interpolate(inner)

    def _interpolate(self, inner: str) -> str:
        out = []
        j = 0
        while j < len(inner):
            if inner[j] == "\\":
                out.append(_unescape(inner[j : j + 2]))
                j += 2
            elif inner.startswith("${", j):
                end = matching_brace(inner, j + 1)
                out.append(groovy_str(evaluate(inner[j + 2 : end], self.scope)))
                j = end + 1
            elif inner[j] == "$" and re.match(r"[A-Za-z_]", inner[j + 1 : j + 2]):
                match = re.match(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*", inner[j + 1 :])
                assert match is not None
                out.append(groovy_str(evaluate(match.group(0), self.scope)))
                j += 1 + match.end()
            else:
                out.append(inner[j])
                j += 1
        return "".join(out)


class _MathNamespace:
    """``Math.max``, ``Math.min`` and ``System.getenv``, the Java statics the subset allows."""

    max = staticmethod(max)
    min = staticmethod(min)
    getenv = staticmethod(os.environ.get)


math_namespace = _MathNamespace()


def _unescape(text: str) -> str:
    escapes = {"\\n": "\n", "\\t": "\t", "\\\\": "\\", "\\'": "'", '\\"': '"', "\\$": "$"}
    return re.sub(r"\\.", lambda m: escapes.get(m.group(0), m.group(0)), text)


def evaluate(src: str, scope: dict[str, Any]) -> Any:
    """Evaluate Groovy-subset source (statements, then a final expression) in ``scope``."""
    parser = _Parser(src, scope)
    value = parser.statements()
    if parser._peek()[0] != "end":
        raise GroovySubsetError(f"unread text in {src!r}")
    return value


def config_value(text: str, scope: dict[str, Any]) -> Any:
    """A config assignment's value: a closure is called (no arguments), anything else evaluated."""
    value = evaluate(text, scope)
    return value() if isinstance(value, _Lambda) else value


# --- Nextflow's own rules, mirrored --------------------------------------------------------------


def parse_cli_param(text: str) -> Any:
    """A ``--name value`` CLI param as nf-schema's ``cast_cli_params`` types it for validation.

    Under the strict parser Nextflow hands CLI params over as strings; nf-schema (>= 2.7.2)
    casts its validation copy like the legacy parser did: true/false, integer, then decimal.
    The script itself still sees the string.
    """
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        return float(text) if "." in text else int(text)
    return text


def staged_names(pattern: str, names: list[str]) -> list[str]:
    """The names Nextflow stages a list of input files under, for a ``stageAs`` pattern.

    Mirrors Nextflow's TaskInputResolver.expandWildcards: ``*`` in the file part keeps the
    source name (or, with other text, becomes the 1-based index); runs of ``?`` become the
    index zero-padded to their length; in the folder part both become the index.
    """
    if not pattern or pattern == "*":
        return list(names)
    if "*" not in pattern and "?" not in pattern and len(names) > 1:
        pattern += "*"

    def expand(text: str, index: int, strip_star: bool = False) -> str:
        text = text.replace("*", "" if strip_star else str(index))
        return re.sub(r"\?+", lambda m: str(index).zfill(len(m.group(0))), text)

    staged = []
    parent, _, name = pattern.rpartition("/")
    for index, source in enumerate(names, start=1):
        file_part = source if name in ("*", "") else expand(name, index, len(names) <= 1)
        staged.append(f"{expand(parent, index)}/{file_part}" if parent else file_part)
    return staged


def function(src: str, name: str) -> Callable[..., Any]:
    """The top-level Groovy function ``def name(params) { ... }`` of ``src``, callable."""
    src = strip_comments(src)
    match = re.search(rf"^def\s+{name}\s*\(([^)]*)\)\s*\{{", src, re.MULTILINE)
    if not match:
        raise GroovySubsetError(f"no function {name}()")
    params = [part.split()[-1] for part in match.group(1).split(",") if part.strip()]
    start = match.end() - 1
    body = src[start + 1 : matching_brace(src, start)]

    def call(*args: Any) -> Any:
        return evaluate(body, dict(zip(params, args, strict=True)))

    return call
