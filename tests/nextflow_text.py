"""Reading the pipeline's Nextflow sources from Python as data, for tests/test_nextflow*.py.

reftrace parses the .nf and .config files (syntax, processes, directives); it does not give a
process's script text or a config value. This module reads those, and evaluates no Groovy:
the pipeline keeps every part the tests look into in a data-like form, and this module reads
exactly those forms and raises :class:`NotDataError` on anything else, so logic that creeps
into the Nextflow side fails the suite instead of being half understood:

- a process script: ``def args = task.ext.args ?: ''`` then one triple-quoted string of
  ``bmseg`` command lines whose only Groovy is ``${name}`` / ``${name.field}``;
- an ``ext.args``: a string literal, or a closure ``{ "..." }`` holding one such string;
- a config value: a literal (number, string without ``${}``, ``true``/``false``/``null``,
  ``N.GB``/``N.h`` sizes, lists and maps of those);
- the resource, retry and GPU closures in one fixed shape each, read into their numbers;
- main.nf's slide-id and file-name rules: ``replaceFirst``/``replaceAll``/``matches`` chains
  with literal patterns, applied here with Python's ``re``;
- the workflows' wiring: which process calls take which processes' ``.out`` channels.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class NotDataError(ValueError):
    """The text holds Groovy beyond the data-like forms this module reads, or is malformed."""


def skip_string(src: str, i: int) -> int:
    """Index just past the string literal (any Groovy quoting) that starts at ``src[i]``."""
    for quote in ('"""', "'''", '"', "'"):
        if src.startswith(quote, i):
            break
    else:
        raise NotDataError(f"no string literal at offset {i}")
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
    raise NotDataError(f"unterminated string starting at offset {i}")


def matching_brace(src: str, i: int) -> int:
    """Index of the ``}`` that closes the ``{`` at ``src[i]``, skipping strings and comments."""
    if src[i] != "{":
        raise NotDataError(f"no '{{' at offset {i}")
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
    raise NotDataError(f"unbalanced '{{' at offset {i}")


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


# --- literals and rendering ----------------------------------------------------------------------

# Nextflow's memory and duration units as numbers: bytes and seconds.
UNITS = {"MB": 1024**2, "GB": 1024**3, "TB": 1024**4, "min": 60, "h": 3600, "d": 86400}

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_SIZED = re.compile(r"(\d+(?:\.\d+)?)\.(" + "|".join(UNITS) + r")")
_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\", "\\'": "'", '\\"': '"', "\\$": "$"}


def _unescape(text: str) -> str:
    return re.sub(r"\\.", lambda m: _ESCAPES.get(m.group(0), m.group(0)), text)


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and strings."""
    parts, depth, start, j = [], 0, 0, 0
    while j < len(text):
        if text[j] in "'\"":
            j = skip_string(text, j)
            continue
        if text[j] in "([{":
            depth += 1
        elif text[j] in ")]}":
            depth -= 1
        elif text[j] == "," and depth == 0:
            parts.append(text[start:j])
            start = j + 1
        j += 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def string_literal(text: str) -> str | None:
    """The value of a Groovy string literal without interpolation, or None for anything else."""
    text = text.strip()
    for quote in ("'", '"'):
        if len(text) >= 2 and text[0] == quote and text[-1] == quote:
            try:
                end = skip_string(text, 0)
            except NotDataError:
                return None
            inner = text[1:-1]
            if end != len(text) or (quote == '"' and re.search(r"(?<!\\)\$", inner)):
                return None
            return _unescape(inner)
    return None


def literal(text: str) -> Any:
    """A Groovy literal as Python: numbers (sizes in bytes / seconds), strings, booleans, null,
    lists and maps of literals. Anything else raises NotDataError."""
    text = text.strip()
    if text in ("true", "false"):
        return text == "true"
    if text == "null":
        return None
    if _NUMBER.fullmatch(text):
        return float(text) if "." in text else int(text)
    if sized := _SIZED.fullmatch(text):
        return float(sized.group(1)) * UNITS[sized.group(2)]
    value = string_literal(text)
    if value is not None:
        return value
    if text.startswith("[") and text.endswith("]"):
        items = _split_top_level(text[1:-1])
        if items and all(re.match(r"\w+\s*:", item) for item in items):
            pairs = [item.split(":", 1) for item in items]
            return {key.strip(): literal(value) for key, value in pairs}
        return [literal(item) for item in items]
    raise NotDataError(f"not a literal: {text!r}")


class PathList(list):
    """A list of staged file names: Nextflow renders it blank-separated inside a script."""

    def __str__(self) -> str:
        return " ".join(str(item) for item in self)


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


_NAME = re.compile(r"\$\{([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\}")


def check_template(template: str) -> str:
    """``template`` if its only Groovy is ``${name}`` / ``${name.field}`` (no escapes, no other
    ``$``), else NotDataError."""
    rest = _NAME.sub("", template)
    if "$" in rest or "\\" in rest:
        raise NotDataError(f"Groovy beyond ${{name}} interpolation in {template.strip()!r}")
    return template


def render(template: str, scope: dict[str, Any]) -> str:
    """``template`` with each ``${a.b}`` replaced by ``scope['a']['b']`` as Groovy renders it.

    A name the scope lacks is an error, not an empty string: the test's inputs must mirror
    the process's.
    """

    def value_of(match: re.Match) -> str:
        first, *fields = match.group(1).split(".")
        if first not in scope:
            raise NotDataError(f"${{{match.group(1)}}}: no {first!r} in scope")
        value = scope[first]
        for field in fields:
            if not isinstance(value, dict) or field not in value:
                raise NotDataError(f"${{{match.group(1)}}}: no field {field!r}")
            value = value[field]
        return groovy_str(value)

    return _NAME.sub(value_of, check_template(template))


def string_template(text: str) -> str:
    """The template of a Groovy string literal (single-quoted: no interpolation)."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == "'" and skip_string(text, 0) == len(text):
        return check_template(_unescape(text[1:-1]))
    if len(text) >= 2 and text[0] == text[-1] == '"' and skip_string(text, 0) == len(text):
        return check_template(text[1:-1])
    raise NotDataError(f"not one string: {text!r}")


def ext_args_template(text: str) -> str:
    """An ``ext.args`` value, a string or a closure ``{ "..." }`` of one string, as a template."""
    text = text.strip()
    closure = re.fullmatch(r"\{\s*(.*?)\s*\}", text, re.DOTALL)
    return string_template(closure.group(1) if closure else text)


SCRIPT_PRELUDE = "def args = task.ext.args ?: ''"
"""The one statement a process script may hold before its command lines."""


def script_template(script_section: str) -> str:
    """A process's ``script:`` section as a template: the prelude, then one triple-quoted
    string whose lines are blank or ``bmseg`` command lines."""
    match = re.fullmatch(
        r"\s*" + re.escape(SCRIPT_PRELUDE) + r'\s*"""\n(.*?)"""\s*', script_section, re.DOTALL
    )
    if not match:
        raise NotDataError(
            f"a script must be {SCRIPT_PRELUDE!r} then one triple-quoted string: "
            f"{script_section.strip()[:120]!r}"
        )
    lines = [line.strip() for line in match.group(1).splitlines()]
    others = [line for line in lines if line and not line.startswith("bmseg ")]
    if others:
        raise NotDataError(f"a script line that is not a bmseg command: {others[0]!r}")
    return check_template("\n".join(line for line in lines if line))


# --- the fixed shapes of closures -----------------------------------------------------------------


@dataclass(frozen=True)
class Growth:
    """``{ task.attempt == 1 ? FIRST : task.previousTrace.KEY * (task.previousTrace.exit in
    [EXITS] ? FACTOR : 1) }``: a request that grows after the given exits."""

    first: float
    key: str
    exits: frozenset[int]
    factor: int

    def request(self, attempt: int, previous: dict[str, Any]) -> float:
        """What Nextflow asks at ``attempt``, ``previous`` being the last attempt's trace."""
        if attempt == 1:
            return self.first
        return previous[self.key] * (self.factor if previous["exit"] in self.exits else 1)


_GROWTH = re.compile(
    r"\{ task\.attempt == 1 \? (?P<first>\S+) : task\.previousTrace\.(?P<key>memory|time) \* "
    r"\(task\.previousTrace\.exit in \[(?P<exits>[\d, ]+)\] \? (?P<factor>\d+) : 1\) \}"
)


def growth(text: str) -> Growth:
    """A resource closure of the one shape the configs use (:class:`Growth`)."""
    match = _GROWTH.fullmatch(text.strip())
    if not match:
        raise NotDataError(f"a resource must grow as {_GROWTH.pattern!r}: {text!r}")
    exits = frozenset(int(code) for code in match.group("exits").split(","))
    return Growth(literal(match.group("first")), match.group("key"), exits, int(match["factor"]))


_RETRY = re.compile(
    r"\{ task\.exitStatus in \(\((?P<low>\d+)\.\.(?P<high>\d+)\)(?P<extra>(?: \+ \d+)*)\) "
    r"\? 'retry' : 'finish' \}"
)


def retried_exits(text: str) -> frozenset[int]:
    """The exit codes an ``errorStrategy`` of the shape ``{ task.exitStatus in ((A..B) + C)
    ? 'retry' : 'finish' }`` retries (every other exit finishes the run)."""
    match = _RETRY.fullmatch(text.strip())
    if not match:
        raise NotDataError(f"errorStrategy must read {_RETRY.pattern!r}: {text!r}")
    codes = set(range(int(match.group("low")), int(match.group("high")) + 1))
    codes |= {int(code) for code in re.findall(r"\d+", match.group("extra"))}
    return frozenset(codes)


_GPU_COUNT = re.compile(
    r"Math\.max\(1, \((?P<vars>System\.getenv\('\w+'\)(?: \?: System\.getenv\('\w+'\))*) "
    r"\?: '0'\)\.tokenize\(','\)\.size\(\)\)"
)


def listed_gpus(text: str) -> Callable[[dict[str, str]], int]:
    """``maxForks`` of the shape ``Math.max(1, (System.getenv('A') ?: ... ?: '0')
    .tokenize(',').size())``: a function of the environment, the number of GPUs listed."""
    match = _GPU_COUNT.fullmatch(text.strip())
    if not match:
        raise NotDataError(f"maxForks must read {_GPU_COUNT.pattern!r}: {text!r}")
    names = re.findall(r"'(\w+)'", match.group("vars"))

    def count(environ: dict[str, str]) -> int:
        listed = next((environ[name] for name in names if environ.get(name)), "0")
        return max(1, len([gpu for gpu in listed.split(",") if gpu]))

    return count


_BY_ENGINE = re.compile(
    r"\{ workflow\.containerEngine == '(?P<engine>\w+)' "
    r"\? (?P<then>'[^']*') : (?P<other>'[^']*') \}"
)


def options_by_engine(text: str) -> Callable[[str], str]:
    """``containerOptions`` of the shape ``{ workflow.containerEngine == 'E' ? 'A' : 'B' }``."""
    match = _BY_ENGINE.fullmatch(text.strip())
    if not match:
        raise NotDataError(f"containerOptions must read {_BY_ENGINE.pattern!r}: {text!r}")
    then, other = literal(match.group("then")), literal(match.group("other"))
    return lambda engine: then if engine == match.group("engine") else other


# --- main.nf's name rules -------------------------------------------------------------------------

_STRING = r"'((?:[^'\\]|\\.)*)'"
_REPLACE = re.compile(rf"\s*\.(replaceFirst|replaceAll)\({_STRING}, {_STRING}\)")


def _rule_body(src: str, name: str) -> str:
    """The expression of ``def name(String name) { return name... }`` in ``src``."""
    src = strip_comments(src)
    match = re.search(rf"^def\s+{name}\(String name\)\s*\{{", src, re.MULTILINE)
    if not match:
        raise NotDataError(f"no function {name}(String name)")
    start = match.end() - 1
    body = src[start + 1 : matching_brace(src, start)].strip()
    if not body.startswith("return name"):
        raise NotDataError(f"{name}() must be 'return name' and a chain of string calls")
    return body[len("return name") :]


def replacement_chain(src: str, name: str) -> Callable[[str], str]:
    """main.nf's ``name`` rule, ``return name.replaceFirst('P', 'R').replaceAll(...)...``,
    as a Python function. Replacements are literal text (no ``$`` groups)."""
    chain = _rule_body(src, name)
    steps = []
    position = 0
    while position < len(chain):
        match = _REPLACE.match(chain, position)
        if not match:
            rest = chain[position:]
            raise NotDataError(f"{name}(): not a replaceFirst/replaceAll call: {rest!r}")
        kind, pattern, replacement = match.group(1), _unescape(match[2]), _unescape(match[3])
        if "$" in replacement or "\\" in replacement:
            raise NotDataError(f"{name}(): replacement {replacement!r} must be literal text")
        steps.append((re.compile(pattern), replacement, 1 if kind == "replaceFirst" else 0))
        position = match.end()

    def apply(text: str) -> str:
        for pattern, replacement, count in steps:
            text = pattern.sub(replacement, text, count=count)
        return text

    return apply


def match_rule(src: str, name: str) -> Callable[[str], bool]:
    """main.nf's ``name`` rule, ``return name.matches('P')``, as a Python function."""
    match = re.fullmatch(rf"\.matches\({_STRING}\)", _rule_body(src, name))
    if not match:
        raise NotDataError(f"{name}() must be 'return name.matches(...)'")
    pattern = re.compile(_unescape(match.group(1)))
    return lambda text: pattern.fullmatch(text) is not None


# --- the workflows' wiring ------------------------------------------------------------------------

_STATEMENT = re.compile(r"^(?P<indent> *)(?:def\s+)?(?P<target>\w+)\s*(?P<kind>=(?!=)|\()", re.M)


def _statements(body: str) -> list[tuple[str, str, str]]:
    """``(target, kind, text)`` for each assignment (``=``) or call (``(``) of a workflow body;
    a statement runs on over the lines indented deeper than its first."""
    found = []
    for match in _STATEMENT.finditer(body):
        indent = len(match.group("indent"))
        end = match.end()
        for line in re.finditer(r"\n( *)(\S)?", body[end:]):
            if line.group(2) and len(line.group(1)) <= indent and line.group(2) not in ".)":
                end += line.start()
                break
        else:
            end = len(body)
        text = body[match.end() : end]
        found.append((match.group("target"), match.group("kind"), text))
    return found


def workflow_dag(bodies: list[str], processes: set[str]) -> dict[str, set[str]]:
    """For each process called in ``bodies`` (workflow bodies, comments removed, in run
    order), the processes whose ``.out`` channels its call takes, through any chain of
    channel variables. A sub-workflow's call binds its ``take:`` names by position."""
    sources: dict[str, set[str]] = {}
    dag: dict[str, set[str]] = {}

    def feeding(text: str) -> set[str]:
        found = {name for name in re.findall(r"\b([A-Z]\w*)\.out\b", text) if name in processes}
        for variable in re.findall(r"\b([a-z_]\w*)\b", text):
            found |= sources.get(variable, set())
        return found

    takes: dict[str, list[str]] = {}
    for body in bodies:
        header = re.search(r"workflow\s+(\w+)\s*\{\s*take:\s*\n(.*?)\n\s*main:", body, re.DOTALL)
        if header:
            takes[header.group(1)] = re.findall(r"^\s*(\w+)", header.group(2), re.MULTILINE)
    for body in bodies:
        for target, kind, text in _statements(body):
            if kind == "=":
                sources.setdefault(target, set()).update(feeding(text))
            elif target in processes:
                dag.setdefault(target, set()).update(feeding(text))
            elif target in takes:
                args = _split_top_level(text[: matching_paren(text)])
                for name, arg in zip(takes[target], args, strict=False):
                    sources.setdefault(name, set()).update(feeding(arg))
    return dag


def matching_paren(text: str) -> int:
    """Index of the ``)`` closing a call whose ``(`` came just before ``text``."""
    depth = 1
    j = 0
    while j < len(text):
        if text[j] in "'\"":
            j = skip_string(text, j)
            continue
        if text[j] in "([{":
            depth += 1
        elif text[j] in ")]}":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    raise NotDataError("unclosed call")


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
