"""Argument rules: CEL expressions compiled once, evaluated per call, failing closed without leaking values."""

from __future__ import annotations

from typing import Any

import cel
import pytest

from portcullis import expressions as rules
from portcullis.expressions import (
    ArgumentRule,
    CompiledRule,
    RuleError,
    RuleEvaluationError,
    compile_rule,
)

TOKEN: dict[str, Any] = {
    "sub": "alice",
    "tenant": "acme",
    "tools": ["send_mail", "search"],
    "access": "read-write",
    "agent_run_id": "run-7",
    "jti": "jti-1",
}
OWN_DOMAIN = 'args.to.all(a, a.endsWith("@acme.example"))'


def rule(expression: str, name: str = "r", message: str | None = None) -> CompiledRule:
    return compile_rule(ArgumentRule(name=name, expression=expression, message=message))


def allows(expression: str, arguments: dict[str, Any] | None, token: dict[str, Any] = TOKEN) -> bool:
    return rule(expression).allows(arguments, token)


def failure(expression: str, arguments: dict[str, Any] | None, token: dict[str, Any] = TOKEN) -> RuleEvaluationError:
    with pytest.raises(RuleEvaluationError) as caught:
        rule(expression, name="the-rule").allows(arguments, token)
    assert caught.value.rule == "the-rule"
    assert str(caught.value) == f"rule 'the-rule' failed to evaluate: {caught.value.reason}"
    return caught.value


def leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in leaves(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in leaves(item)]
    return [value]


def test_the_example_rule_allows_own_domain_and_denies_others() -> None:
    compiled = rule(OWN_DOMAIN, name="own-domain-only", message="mail may only go to acme.example addresses")
    assert compiled.name == "own-domain-only"
    assert compiled.message == "mail may only go to acme.example addresses"
    assert compiled.allows({"to": ["a@acme.example", "b@acme.example"]}, TOKEN) is True
    assert compiled.allows({"to": ["a@acme.example", "eve@evil.example"]}, TOKEN) is False
    assert compiled.allows({"to": []}, TOKEN) is True


def test_message_is_optional() -> None:
    assert rule("true").message is None


def test_no_arguments_is_an_empty_map() -> None:
    assert allows("args == {}", None)
    assert allows("size(args) == 0", None)
    assert allows('!has(args.to)', None)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ('token.sub == "alice"', True),
        ('token.tenant == "acme"', True),
        ('"send_mail" in token.tools', True),
        ('token.access == "read-write"', True),
        ('token.agent_run_id == "run-7"', True),
        ('token.jti == "jti-1"', True),
        ('token.sub == "bob"', False),
    ],
)
def test_token_variables(expression: str, expected: bool) -> None:
    assert allows(expression, {}) is expected


def test_token_fields_may_be_null_and_missing_ones_are_null() -> None:
    token = {"sub": "alice", "tenant": "acme", "tools": None, "access": None, "agent_run_id": None, "jti": "j"}
    assert allows("token.tools == null && token.access == null && token.agent_run_id == null", {}, token)
    assert allows("token.agent_run_id == null", {}, {"sub": "alice", "tenant": "acme", "jti": "j"})


def test_token_shows_only_the_documented_fields() -> None:
    assert allows('!has(token.secret) && size(token) == 6', {}, {**TOKEN, "secret": "s3cr3t"})


def test_nested_arguments() -> None:
    arguments = {"query": {"filters": [{"field": "owner", "value": "alice"}, {"field": "year", "value": 2024}]}}
    assert allows('args.query.filters.exists(f, f.field == "owner" && f.value == token.sub)', arguments)
    assert allows("args.query.filters[1].value >= 2000", arguments)
    assert not allows('args.query.filters.all(f, f.field != "year")', arguments)
    assert allows('has(args.query.filters) && !has(args.query.sort)', arguments)


@pytest.mark.parametrize("limit", [3, 3.0])
def test_a_whole_float_is_an_int(limit: float) -> None:
    assert allows("args.limit < 10", {"limit": limit})
    assert allows("args.limit == 3", {"limit": limit})
    assert allows("args.limit + 1 == 4", {"limit": limit})
    assert allows("type(args.limit) == int", {"limit": limit})
    assert allows("args.limit <= 9.99", {"limit": limit})


def test_fractional_floats_stay_doubles_and_compare_with_ints() -> None:
    assert allows("args.limit < 10", {"limit": 3.5})
    assert not allows("args.limit < 3", {"limit": 3.5})
    assert allows("type(args.limit) == double", {"limit": 3.5})
    assert allows("double(args.limit) * 2.0 == 7.0", {"limit": 3.5})


def test_arithmetic_does_not_mix_int_and_double() -> None:
    assert failure("args.ratio * 2 < 10", {"ratio": 0.5}).reason == "no matching overload (mismatched types)"
    assert allows("double(args.n) * 0.5 == 1.5", {"n": 3})


def test_ints_beyond_int64_become_doubles() -> None:
    assert allows("args.n > 1000 && type(args.n) == double", {"n": 2**70})
    assert allows("type(args.n) == int", {"n": 2**63 - 1})
    assert failure("args.n > 0", {"n": 10**400}).reason == "an argument is a number out of range"


def test_bools_are_not_numbers() -> None:
    assert allows("args.flag == true && type(args.flag) == bool", {"flag": True})
    assert failure("args.flag < 10", {"flag": True}).reason == "no matching overload (mismatched types)"


def test_unicode() -> None:
    arguments = {"city": "Zürich", "greeting": "こんにちは 👋"}
    assert allows('args.city == "Zürich" && args.city.startsWith("Zü")', arguments)
    assert allows('args.greeting.contains("👋") && args.greeting.matches("^こんにちは")', arguments)
    assert allows('"Zürich" in ["Zürich", "Genève"]', {})


def test_size_of_a_string_counts_utf8_bytes() -> None:
    # A gap of cel 0.10 against the spec (code points), documented in rules.py: limits are in bytes.
    assert allows("size(args.s) == 5", {"s": "über"})


def test_a_large_list_argument_completes() -> None:
    addresses = [f"user{i}@acme.example" for i in range(100_000)]
    compiled = rule(OWN_DOMAIN)
    assert compiled.allows({"to": addresses}, TOKEN)
    assert not compiled.allows({"to": [*addresses, "eve@evil.example"]}, TOKEN)


@pytest.mark.parametrize(
    ("expression", "arguments", "reason"),
    [
        ('args.missing == "x"', {"present": "SECRET-VALUE"}, "no such key"),
        ("args.m[args.k] == 1", {"m": {}, "k": "SECRET-VALUE"}, "no such key"),
        ("args.l[3] == 1", {"l": ["SECRET-VALUE"]}, "index out of range"),
        ("args.s + 1 == 2", {"s": "SECRET-VALUE"}, "no matching overload (mismatched types)"),
        ("args.n / args.z == 1", {"n": 912345, "z": 0}, "division by zero"),
        ("args.n + args.n > 0", {"n": 2**62 + 912345}, "arithmetic overflow"),
        ("args.s.matches(args.re)", {"s": "x", "re": "[SECRET-VALUE"}, "function 'matches' failed"),
        ("args.s.lowerAscii() == 'x'", {"s": "SECRET-VALUE"}, "no such function or variable 'lowerAscii'"),
        ("args.s == 'x'", {"s": "SECRET-VALUE\ud800"}, "an argument cannot be converted"),
        ("args.s", {"s": "SECRET-VALUE"}, "the result is a string, not a bool"),
        ("args.n", {"n": 912345}, "the result is an int, not a bool"),
        ("args.l", {"l": ["SECRET-VALUE"]}, "the result is a list, not a bool"),
        ("args.x", {"x": None, "y": "SECRET-VALUE"}, "the result is null, not a bool"),
    ],
)
def test_evaluation_failures_fail_closed_without_argument_values(
    expression: str, arguments: dict[str, Any], reason: str
) -> None:
    caught = failure(expression, arguments)
    assert caught.reason == reason
    values = [str(value) for value in leaves(arguments) if len(str(value)) >= 5]
    assert values
    for text in (caught.reason, str(caught), repr(caught)):
        assert "SECRET" not in text
        assert not [value for value in values if value in text]
    assert caught.__cause__ is None and (caught.__context__ is None or caught.__suppress_context__)


def test_arguments_rules_cannot_see_are_a_denial() -> None:
    deep: list[Any] = []
    for _ in range(10_000):  # the library's own conversion would overflow the native stack
        deep = [deep]
    assert failure("true", {"d": deep}).reason == f"the arguments are nested more than {rules.MAX_DEPTH} deep"
    assert failure("true", {"x": object()}).reason == "an argument is of a type rules cannot see (object)"
    assert failure("true", {"m": {1: "SECRET"}}).reason == "an argument is a map with a key that is not a string"


def test_nesting_up_to_the_limit_is_fine() -> None:
    nested: Any = "leaf"
    for _ in range(rules.MAX_DEPTH - 1):  # and `args` itself
        nested = {"n": nested}
    assert allows("has(args.n)", {"n": nested})
    assert failure("has(args.n)", {"n": {"n": nested}}).reason.startswith("the arguments are nested more than")


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("args.to.all(a, a.endsWith('@acme.example'", "rule 'r': line 1, column 42: Syntax error: mismatched input"),
        ("1 +", "rule 'r': line 1, column 4: Syntax error: mismatched input '<EOF>'"),
        ("true &&\n\n  args.x.", "rule 'r': line 3, column 10: Syntax error: no viable alternative"),
        ("9223372036854775808 == 1", "rule 'r': line 1, column 1: invalid int literal"),
        ("(" * 100 + "1" + ")" * 100, "rule 'r': line 1, column 97: Recursion limit of 96 exceeded"),
        ("arg.to == 'x'", "rule 'r': unknown variable 'arg'; a rule sees only 'args' and 'token'"),
        ("to.all(a, a == 'x')", "rule 'r': unknown variable 'to'"),
        ("", "rule 'r': the expression must be a non-empty string"),
        ("   ", "rule 'r': the expression must be a non-empty string"),
        ("x" * 5000, "rule 'r': the expression is 5000 characters, at most 4096"),
    ],
)
def test_rules_that_do_not_compile(expression: str, expected: str) -> None:
    with pytest.raises(RuleError) as caught:
        rule(expression)
    assert str(caught.value).startswith(expected)
    assert len(str(caught.value)) < 300
    assert isinstance(caught.value, ValueError)


def test_a_compile_error_does_not_echo_a_long_expression() -> None:
    expression = "args.x == '" + "y" * 3000 + "' &&"
    with pytest.raises(RuleError) as caught:
        rule(expression)
    assert "yyyy" not in str(caught.value)
    assert str(caught.value).startswith("rule 'r': line 1, column 3016: ")


def test_a_compile_error_is_found_after_the_echoed_expression() -> None:
    with pytest.raises(RuleError) as caught:
        rule("'ERROR: <input>:9:9: decoy' ==")
    assert str(caught.value).startswith("rule 'r': line 1, column 31: Syntax error")


def test_type_names_are_not_unknown_variables() -> None:
    assert allows("type(args.n) == int && type(args.s) == string && type(args.l) == list", {"n": 1, "s": "", "l": []})


def test_macro_variables_are_not_unknown() -> None:
    assert allows("args.l.map(x, x * 2).exists(y, y == 4) && args.l.exists_one(z, z == 1)", {"l": [1, 2]})
    assert allows("args.l.filter(v, v > 1).all(w, w > 1)", {"l": [1, 2]})


@pytest.mark.parametrize(
    "bad",
    [
        ArgumentRule(name="", expression="true"),
        ArgumentRule(name="has space", expression="true"),
        ArgumentRule(name="x" * 64, expression="true"),
        ArgumentRule(name="ok", expression=True),  # type: ignore[arg-type]  # as YAML may give
        ArgumentRule(name="ok", expression="true", message=3),  # type: ignore[arg-type]
    ],
)
def test_malformed_rules(bad: ArgumentRule) -> None:
    with pytest.raises(RuleError):
        compile_rule(bad)


def test_evaluation_does_not_parse_again(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = rule(OWN_DOMAIN)

    def no_parsing(*_: object, **__: object) -> None:
        raise AssertionError("parsed during evaluation")

    monkeypatch.setattr(cel, "compile", no_parsing)
    monkeypatch.setattr(cel, "evaluate", no_parsing)
    for _ in range(3):
        assert compiled.allows({"to": ["a@acme.example"]}, TOKEN)
        assert not compiled.allows({"to": ["eve@evil.example"]}, TOKEN)
    with pytest.raises(RuleError):
        rule("true")  # the patch is in force: compile_rule does go through it


def test_repr_names_the_rule_only() -> None:
    assert repr(rule(OWN_DOMAIN, name="own-domain-only")) == "CompiledRule(name='own-domain-only')"
