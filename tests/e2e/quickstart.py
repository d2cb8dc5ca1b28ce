"""The README's cluster quickstart as data: the shell block between the e2e markers.

README.md's "### In a cluster" section holds one ```sh block between `<!-- e2e:begin -->` and
`<!-- e2e:end -->`. The cluster suite runs that block verbatim with bash (`conftest.py`); the
offline tests (`test_readme_quickstart.py`) read the same commands and check every path, flag,
name and port in them against the repository, so the README cannot drift from what works.

Parsing is deliberately small: enough shell to split a line into its simple commands (pipes,
`&`, redirections, `$(...)` substitutions, `NAME=value` assignments) and to read the flags of
the tools the quickstart uses. An unknown flag is an error, not a guess: whoever adds one to the
README says here what it takes. Nothing in this module needs a cluster.

    python -m tests.e2e.quickstart      # print the block (the kind workflow logs it)
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECTION = "### In a cluster"
BEGIN, END = "<!-- e2e:begin -->", "<!-- e2e:end -->"

_SEPARATORS = {"|", "||", "&", "&&", ";", "(", ")"}
_REDIRECTS = {">", ">>", "<", "2>", ">&", "2>&1"}
_ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.S)
_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class QuickstartError(ValueError):
    """The README's quickstart block is missing, duplicated or not shell this module reads."""


def script(readme: str | None = None) -> str:
    """The shell block between the markers, exactly as written (what bash runs)."""
    text = README.read_text() if readme is None else readme
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise QuickstartError(f"README.md must hold {BEGIN} and {END} exactly once each")
    before, rest = text.split(BEGIN, 1)
    inside = rest.split(END, 1)[0]
    if SECTION not in before or "\n## " in before.split(SECTION, 1)[1] or "\n### " in before.split(SECTION, 1)[1]:
        raise QuickstartError(f"the e2e markers must sit inside README.md's {SECTION!r} section")
    fenced = re.fullmatch(r"\s*```sh\n(.*?)\n```\s*", inside, flags=re.S)
    if fenced is None:
        raise QuickstartError("between the e2e markers there must be exactly one ```sh block and nothing else")
    return fenced.group(1) + "\n"


def logical_lines(block: str) -> list[str]:
    """Backslash continuations joined; blank lines and comment lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def _substitutions(word: str) -> list[str]:
    """The commands inside `$(...)` in one word (balanced, possibly several)."""
    found, start = [], word.find("$(")
    while start != -1:
        depth, i = 0, start + 1
        for i in range(start + 1, len(word)):
            depth += {"(": 1, ")": -1}.get(word[i], 0)
            if depth == 0:
                break
        found.append(word[start + 2 : i])
        start = word.find("$(", i)
    return found


def simple_commands(line: str) -> list[list[str]]:
    """Every simple command in one logical line, substitutions included, redirections removed."""
    out: list[list[str]] = []
    current: list[str] = []
    skip_next = False
    for token in _tokens(line):
        if skip_next:
            skip_next = False
            continue
        if token in _SEPARATORS:
            if current:
                out.append(current)
            current = []
        elif token in _REDIRECTS:
            skip_next = token not in {"2>&1"}
        else:
            current.append(token)
            for inner in _substitutions(token):
                out.extend(simple_commands(inner))
    if current:
        out.append(current)
    # `NAME=$(cmd)` tokenizes as `NAME=$` then `( cmd )`: the bare `NAME=$` is no command.
    return [c for c in out if not (len(c) == 1 and c[0].endswith("=$"))]


def parse_flags(
    argv: Sequence[str], *, with_value: Iterable[str], without_value: Iterable[str] = ()
) -> tuple[list[str], list[tuple[str, str | None]]]:
    """Split arguments into positionals and (flag, value) pairs; an unknown flag raises.

    `--flag=value` and `--flag value` both work; `-fsS`-style clusters of value-less short
    flags are split into their letters.
    """
    takes, plain = set(with_value), set(without_value)
    positionals: list[str] = []
    flags: list[tuple[str, str | None]] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("-") or arg == "-":
            positionals.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if name in takes:
            if not eq:
                if not args:
                    raise QuickstartError(f"{name} needs a value")
                value = args.pop(0)
            flags.append((name, value))
        elif name in plain and not eq:
            flags.append((name, None))
        elif not name.startswith("--") and len(name) > 2 and all(f"-{c}" in plain for c in name[1:]):
            flags.extend((f"-{c}", None) for c in name[1:])
        else:
            raise QuickstartError(f"unknown flag {arg!r} in {' '.join(argv)!r}: say in tests/e2e/quickstart.py what it takes")
    return positionals, flags


@dataclass(frozen=True)
class Curl:
    """One curl invocation of the quickstart, its `$NAME` headers resolved where assigned."""

    method: str
    url: str
    headers: tuple[str, ...]
    data: str | None
    flags: tuple[str, ...] = ()

    def header(self, name: str) -> str | None:
        for line in self.headers:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


CURL_WITH_VALUE = ("-X", "--request", "-H", "--header", "-d", "--data", "--data-raw", "--retry", "--retry-delay", "--max-time")
CURL_WITHOUT_VALUE = ("-f", "-s", "-S", "--fail", "--silent", "--show-error", "--retry-connrefused")


@dataclass
class Quickstart:
    """The parsed quickstart: its lines, every simple command, and its shell variables."""

    lines: list[str]
    commands: list[list[str]] = field(default_factory=list)
    assignments: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_readme(cls, readme: str | None = None) -> Quickstart:
        lines = logical_lines(script(readme))
        parsed = cls(lines)
        for line in lines:
            parsed.commands.extend(c for c in simple_commands(line) if not _ASSIGNMENT.fullmatch(c[0]) or len(c) > 1)
            name = re.match(r"([A-Za-z_][A-Za-z0-9_]*)=", line)
            if name is not None:
                tokens = _tokens(line)
                # `NAME="literal $(cmd)"` is one word; `NAME=$(cmd ...)` is kept as written.
                assigned = _ASSIGNMENT.fullmatch(tokens[0]) if len(tokens) == 1 else None
                parsed.assignments[name.group(1)] = assigned.group(2) if assigned else line[name.end() :]
        return parsed

    def find(self, *prefix: str) -> list[list[str]]:
        """Commands whose first words are `prefix`."""
        return [c for c in self.commands if c[: len(prefix)] == list(prefix)]

    def one(self, *prefix: str) -> list[str]:
        found = self.find(*prefix)
        if len(found) != 1:
            raise QuickstartError(f"expected exactly one `{' '.join(prefix)}` in the quickstart, found {len(found)}")
        return found[0]

    def resolve(self, word: str) -> str:
        """`$NAME` replaced by its assignment, when the quickstart assigns it a literal."""

        def value(match: re.Match[str]) -> str:
            name = match.group(1) or match.group(2)
            assigned = self.assignments.get(name)
            return assigned if assigned is not None and not assigned.startswith("$(") else match.group(0)

        return _VARIABLE.sub(value, word)

    def curls(self) -> list[Curl]:
        out = []
        for argv in self.find("curl"):
            positionals, flags = parse_flags(argv[1:], with_value=CURL_WITH_VALUE, without_value=CURL_WITHOUT_VALUE)
            if len(positionals) != 1:
                raise QuickstartError(f"expected one URL in {' '.join(argv)!r}, found {positionals}")
            values: dict[str, list[str]] = {}
            for name, value in flags:
                values.setdefault(name, []).append(value or "")
            sent = values.get("-d", []) + values.get("--data", []) + values.get("--data-raw", [])
            data = sent[-1] if sent else None
            method = (values.get("-X") or values.get("--request") or ["POST" if data is not None else "GET"])[-1]
            headers = tuple(self.resolve(h) for h in values.get("-H", []) + values.get("--header", []))
            out.append(Curl(method, positionals[0], headers, data, tuple(n for n, v in flags if v is None)))
        return out


@dataclass(frozen=True)
class QuickstartRun:
    """What running the block left behind (conftest.py's `readme_quickstart`)."""

    transcript: str
    """Everything the commands printed, stdout and stderr interleaved."""
    log: Path


@dataclass(frozen=True)
class Names:
    """The names the quickstart uses, for the cluster tests that carry its story on."""

    namespace: str
    server: str
    account: str
    user: str
    connection: str
    secret: str
    tool: str


def names(qs: Quickstart | None = None) -> Names:
    """Read from the commands (test_readme_quickstart.py checks they are consistent)."""
    qs = qs or Quickstart.from_readme()
    wait = parse_flags(qs.one("kubectl", "wait")[2:], with_value=("-n", "--namespace", "--for", "--timeout"))
    token = parse_flags(qs.one("kubectl", "create", "token")[3:], with_value=("-n", "--namespace", "--duration"))
    put = next(c for c in qs.curls() if c.method == "PUT")
    call = next(c for c in qs.curls() if c.url.endswith("/mcp"))
    *_, user, _, connection = put.url.split("/")
    return Names(
        namespace=str(dict(wait[1]).get("-n") or dict(wait[1]).get("--namespace")),
        server=wait[0][0].partition("/")[2],
        account=token[0][0],
        user=user,
        connection=connection,
        secret=str(json.loads(put.data or "{}")["secret"]),
        tool=str(call.header("Mcp-Name")),
    )


def main() -> int:
    sys.stdout.write(script())
    return 0


if __name__ == "__main__":
    sys.exit(main())
