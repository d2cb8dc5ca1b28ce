"""Argument rules: per-tool CEL expressions that a call's arguments must satisfy before it is forwarded.

A platform engineer writes, in a ToolMapping, `rules: [{name, expression, message?}]`. Each rule is
compiled once, when the config is compiled (`compile_rule`, which raises `RuleError`), and evaluated
for every call (`CompiledRule.allows`). The expression sees two variables: `args`, the call's
arguments as a map (`{}` when the call has none), and `token`, a map of exactly `sub`, `tenant`,
`tools` (list or null), `access`, `agent_run_id` (string or null) and `jti`. A rule allows a call
only when it evaluates to `true`; `false` denies it, and anything else (a missing key, a type
mismatch, a result that is not a bool) is a denial too: `allows` raises `RuleEvaluationError`, whose
`reason` is one of a few fixed phrases, so an audit line names the rule and what went wrong and
never an argument's value.

The library is common-expression-language (import `cel`, Rust's cel crate behind PyO3), not
cel-python (`celpy`, pure Python). Measured here on the example rule
`args.to.all(a, a.endsWith("@acme.example"))` with three addresses, the median of 10,000
evaluations of a compiled rule was 16 µs with cel (19-29 µs through `allows`, conversion
included) against 340-355 µs with cel-python, and a 100,000-address list took 0.12-0.23 s
against 11-15 s. cel follows the spec where rules meet JSON numbers, comparing int with double
(`3.0 < 10`, `1 == 1.0`), where cel-python 0.5 fails on `1 < 1.5` yet accepts `1.5 + 1` and
`true < 10`; cel's compile errors give line, column and the tokens expected, where cel-python's
give a caret, and its error for an unknown name dumps the whole activation, argument values and all.
Both are maintained, run no Python from an expression, and are bounded (no loops but the
comprehension macros over finite lists, though nested ones multiply: 1,000 x 1,000 took 0.36 s;
linear-time regular expressions); cel's one hazard is
that its conversion overflows the native stack on arguments nested thousands deep, which this
module's own conversion stops at `MAX_DEPTH`. Known gap: cel 0.10's `size()` of a string counts
UTF-8 bytes, not code points, so `size(args.s) <= 100` is a limit in bytes (`"über"` is 5).

Numbers: JSON does not tell 3 from 3.0 (JavaScript never sends 3.0; JSON Schema calls both an
integer), so a whole float within int64 becomes an int, and an int beyond int64 becomes a double.
Comparisons mix int and double freely (`args.limit < 10` and `args.price <= 9.99` hold for 3 and for
3.0 alike), but arithmetic does not: with `args.ratio` 0.5 `args.ratio * 2` has no overload, so
rule authors convert explicitly: `double(args.ratio) * 2.0 <= 1.0`, `int(args.n) + 1`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import cel

MAX_EXPRESSION_LENGTH: Final = 4096
MAX_DEPTH: Final = 64
TOKEN_FIELDS: Final = ("sub", "tenant", "tools", "access", "agent_run_id", "jti")
VARIABLES: Final = frozenset({"args", "token"})
_TYPES: Final = frozenset({"bool", "bytes", "double", "int", "list", "map", "null_type", "string", "type", "uint"})

_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_INT64: Final = range(-(2**63), 2**63)
# Names bound by a comprehension macro, `list.all(x, ...)`: not variables of the rule's own.
_BOUND: Final = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,")
_PARSE_ERROR: Final = re.compile(r"ERROR: <input>:(\d+):(\d+): ([^\n]*)")
_INNER_MESSAGE: Final = re.compile(r'msg: "([^"]*)"')
_UNDEFINED: Final = re.compile(r"Undefined variable or function: '([A-Za-z_][A-Za-z0-9_]*)'")
_FUNCTION_FAILED: Final = re.compile(r"Function '([A-Za-z_][A-Za-z0-9_.]*)' error")
_REASONS: Final[tuple[tuple[type[BaseException], str], ...]] = (
    (KeyError, "no such key"),
    (IndexError, "index out of range"),
    (ZeroDivisionError, "division by zero"),
    (OverflowError, "arithmetic overflow"),
    (TypeError, "no matching overload (mismatched types)"),
)


class RuleError(ValueError):
    """A rule that does not compile; the message says why, without quoting the whole expression."""


class RuleEvaluationError(Exception):
    """A rule that could not be evaluated for a call: a denial. `reason` never holds an argument's value."""

    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(f"rule {rule!r} failed to evaluate: {reason}")
        self.rule = rule
        self.reason = reason


@dataclass(frozen=True)
class ArgumentRule:
    """One entry of a tool's `rules` in a ToolMapping."""

    name: str
    expression: str
    message: str | None = None


class CompiledRule:
    """A rule compiled once, evaluated per call without parsing again."""

    def __init__(self, rule: ArgumentRule, program: cel.Program) -> None:
        self.name = rule.name
        self.message = rule.message
        self.expression = rule.expression
        self._program = program

    def __repr__(self) -> str:
        return f"CompiledRule(name={self.name!r})"

    def allows(self, arguments: Mapping[str, Any] | None, token: Mapping[str, Any]) -> bool:
        """True when the expression is true for this call, False when it is false.

        Raises RuleEvaluationError (deny) when it cannot be evaluated or is not a bool.
        """
        try:
            bindings = {
                "args": _to_cel({} if arguments is None else arguments, 0),
                "token": {field: _to_cel(token.get(field), 0) for field in TOKEN_FIELDS},
            }
        except _Unconvertible as exc:
            raise RuleEvaluationError(self.name, str(exc)) from None
        try:
            result = self._program.execute(bindings)
        except Exception as exc:  # the library reports every failure as a builtin exception
            raise RuleEvaluationError(self.name, _reason(exc)) from None
        if type(result) is not bool:
            raise RuleEvaluationError(self.name, f"the result is {_type_name(result)}, not a bool")
        return result


def compile_rule(rule: ArgumentRule) -> CompiledRule:
    """Compile `rule`, or raise RuleError saying what is wrong with it."""
    if not isinstance(rule.name, str) or _NAME.fullmatch(rule.name) is None:
        raise RuleError("a rule's name must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if not isinstance(rule.expression, str) or not rule.expression.strip():
        raise RuleError(f"rule {rule.name!r}: the expression must be a non-empty string")
    if len(rule.expression) > MAX_EXPRESSION_LENGTH:
        raise RuleError(
            f"rule {rule.name!r}: the expression is {len(rule.expression)} characters, at most {MAX_EXPRESSION_LENGTH}"
        )
    if rule.message is not None and not isinstance(rule.message, str):
        raise RuleError(f"rule {rule.name!r}: the message must be a string")
    # Imported on first use, not with this module: cel brings its command-line tool's libraries
    # (about 300 modules), and a gateway without rules should not carry them in its heap.
    import cel

    try:
        program = cel.compile(rule.expression)
    except Exception as exc:
        raise RuleError(f"rule {rule.name!r}: {_parse_error(str(exc), rule.expression)}") from None
    unknown = sorted(set(program.variables()) - VARIABLES - _TYPES - set(_BOUND.findall(rule.expression)))
    if unknown:
        raise RuleError(f"rule {rule.name!r}: unknown variable {unknown[0]!r}; a rule sees only 'args' and 'token'")
    return CompiledRule(rule, program)


class _Unconvertible(Exception):
    pass


def _to_cel(value: Any, depth: int) -> Any:
    """A JSON-ish value as the plain Python that `cel` converts: whole floats as ints, bounded depth."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if value in _INT64:
            return value
        try:
            return float(value)
        except OverflowError:
            raise _Unconvertible("an argument is a number out of range") from None
    if isinstance(value, float):
        return int(value) if value.is_integer() and int(value) in _INT64 else value
    if depth >= MAX_DEPTH:
        raise _Unconvertible(f"the arguments are nested more than {MAX_DEPTH} deep")
    if isinstance(value, (list, tuple)):
        return [_to_cel(item, depth + 1) for item in value]
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            raise _Unconvertible("an argument is a map with a key that is not a string")
        return {key: _to_cel(item, depth + 1) for key, item in value.items()}
    raise _Unconvertible(f"an argument is of a type rules cannot see ({type(value).__name__})")


def _reason(exc: Exception) -> str:
    """A fixed phrase for what went wrong; identifiers from the expression at most, never values."""
    for kind, phrase in _REASONS:
        if isinstance(exc, kind):
            return phrase
    text = str(exc)
    if named := _UNDEFINED.match(text):
        return f"no such function or variable {named.group(1)!r}"
    if named := _FUNCTION_FAILED.match(text):
        return f"function {named.group(1)!r} failed"
    if "Failed to convert" in text:  # e.g. a string with a lone surrogate
        return "an argument cannot be converted"
    return f"evaluation failed ({type(exc).__name__})"


def _parse_error(text: str, expression: str) -> str:
    """The first error of the library's report, with its position, without the echoed expression."""
    found = _PARSE_ERROR.search(text.removeprefix(f"Failed to parse expression '{expression}': "))
    if found is None:
        return "the expression does not compile"
    line, column, message = found.groups()
    inner = _INNER_MESSAGE.search(message)
    message = (inner.group(1) if inner else message).strip()
    if len(message) > 200:
        message = message[:200] + "..."
    return f"line {line}, column {column}: {message}"


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    names = {int: "an int", float: "a double", str: "a string", bytes: "bytes", list: "a list", dict: "a map"}
    return names.get(type(value), f"a {type(value).__name__}")
