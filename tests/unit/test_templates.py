"""The shared Liquid environment: syntax errors name their line; rendering is bounded."""

from __future__ import annotations

import pytest
from liquid.exceptions import LiquidError

from opensequence.mail.templates import TemplateSyntaxError, compile_template


def test_renders_contact_values_with_defaults() -> None:
    template = compile_template('Hi {{ contact.custom_data.plan | default: "free" }}')
    assert template.render(contact={"custom_data": {}}) == "Hi free"


@pytest.mark.parametrize(
    ("source", "line"),
    [
        ("Hello\n\n{% if contact.name %}\n{% endfor %}", 4),
        ("a\n{% nosuchtag %}", 2),
        ("a\nb\n{% for x in y %}", 3),
    ],
)
def test_syntax_errors_name_the_line(source: str, line: int) -> None:
    with pytest.raises(TemplateSyntaxError) as caught:
        compile_template(source)
    assert caught.value.line == line
    assert str(caught.value).startswith(f"line {line}: ")


def test_text_that_looks_like_code_is_plain_text() -> None:
    source = "'; DROP TABLE contacts; -- <script>{{ '{{' }}</script>"
    assert compile_template(source).render() == "'; DROP TABLE contacts; -- <script>{{</script>"


def test_runaway_loops_are_cut_off() -> None:
    template = compile_template(
        "{% for a in (1..1000) %}{% for b in (1..1000) %}x{% endfor %}{% endfor %}"
    )
    with pytest.raises(LiquidError):
        template.render()
