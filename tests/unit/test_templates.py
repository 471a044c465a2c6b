"""The shared Liquid environment: syntax errors name their line; rendering is bounded."""

from __future__ import annotations

import re
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from liquid.exceptions import LiquidError

from opensequence.mail import templates
from opensequence.mail.render import SLOW_TEMPLATE_CHARS, TemplateError, may_be_slow, render
from opensequence.mail.templates import (
    MAX_UNCLOSED_OPENERS,
    TemplateEnvironment,
    TemplateSyntaxError,
    compile_template,
)


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


_KEYS = st.sampled_from(["a", "b", "c", "size", "first", "last"])
_VALUES = st.recursive(
    st.one_of(
        st.text(alphabet=st.sampled_from(list("ab <>&\"'\r\n\té")), max_size=12),
        st.integers(min_value=-(10**6), max_value=10**6),
        st.booleans(),
        st.none(),
        st.floats(allow_nan=False, allow_infinity=False, width=32),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=8,
)
_PIECES = st.one_of(
    st.text(alphabet=st.sampled_from(list("xy <&\r\n")), max_size=6),
    st.lists(_KEYS, min_size=1, max_size=3).map(lambda keys: "{{ " + ".".join(keys) + " }}"),
    st.lists(_KEYS, min_size=1, max_size=2).map(lambda keys: "{{- " + ".".join(keys) + " -}}"),
    st.sampled_from(
        [
            "{{ a | upcase }}",
            "{{ a[0] }}",
            "{{ a['b'] }}",
            "{% if a %}t{% endif %}",
            "{% assign a = 'z' %}",
            "{{ 'lit' }}",
            "{{ 3 }}",
            "{% raw %}{{ a }}{% endraw %}",
        ]
    ),
)


@settings(max_examples=1000, deadline=None)
@given(
    pieces=st.lists(_PIECES, max_size=6),
    context=st.dictionaries(_KEYS, _VALUES, max_size=5),
    html=st.booleans(),
)
def test_substitution_plans_render_exactly_as_liquid(
    pieces: list[str], context: dict[str, object], html: bool
) -> None:
    """``render`` takes a shortcut for plain substitutions; its result (or its failure) must be
    Liquid's own for every template and context."""
    source = "".join(pieces)
    expected: str | type[Exception]
    try:
        expected = TemplateEnvironment(autoescape=html).from_string(source).render(**context)
    except LiquidError:
        expected = TemplateError
    try:
        got: str | type[Exception] = render(source, context, html=html)
    except TemplateError:
        got = TemplateError
    assert got == expected


@pytest.mark.parametrize(
    ("source", "slow"),
    [
        ("Hi {{ contact.name }}", False),
        ("{% if contact.name %}for {{ contact.name }}{% endif %}", False),  # "for" is text here
        ("{% for i in (1..3) %}{{ i }}{% endfor %}", True),
        ("{%- for tag in contact.custom_data.tags | split: ',' -%}{{ tag }}{%- endfor -%}", True),
        ("{% tablerow i in (1..2) %}{{ i }}{% endtablerow %}", True),
        ("{% liquid\n  assign n = 3\n  for i in (1..n)\n    echo i\n  endfor\n%}", True),
        ("<p>" + "x" * SLOW_TEMPLATE_CHARS + "</p>", True),
        ("<p>" + "x" * (SLOW_TEMPLATE_CHARS - 8) + "</p>", False),
        ("{{ (1..5) | join }}", True),
        ("{% assign r = (1..n) %}{{ r | size }}", True),
        ("<p>(see the list...)</p> {{ contact.name }}", False),  # a range only inside markup
    ],
)
def test_templates_that_may_render_slowly_are_told_apart(source: str, slow: bool) -> None:
    assert may_be_slow(source) is slow


@pytest.mark.parametrize(
    ("source", "line", "count", "opens", "closes"),
    [
        ("Hi {{ contact.name }}\n" + "{{" * 20_000, 2, 20_000, "'{{'", "'}}'"),  # 47 s to lex
        ("a\nb\n" + "{" * 20_000, 3, 10_000, "'{{'", "'}}'"),
        ("{% raw %}x{% endraw %}\n" + "{% raw %}" * 200, 2, 200, "'{% raw %}'", "'{% endraw %}'"),
        ("{%- doc -%}" * 101, 1, 101, "'{% doc %}'", "'{% enddoc %}'"),
        # Valid Liquid, but lexed in quadratic time all the same: refused too.
        ("{% raw %}" + "{{ " * 200 + "{% endraw %}", 1, 200, "'{{'", "'}}'"),
    ],
)
def test_many_unclosed_openers_are_refused_without_lexing(
    source: str, line: int, count: int, opens: str, closes: str
) -> None:
    with pytest.raises(TemplateSyntaxError) as caught:
        compile_template(source)
    assert caught.value.line == line
    assert caught.value.detail == (
        f"{count} {opens} with no {closes} after them; at most {MAX_UNCLOSED_OPENERS} are"
        " accepted, in comment and raw blocks too"
    )


def test_up_to_the_limit_unclosed_openers_get_liquids_own_answer() -> None:
    with pytest.raises(TemplateSyntaxError, match="expected '}}', found end of file"):
        compile_template("{{ a }}" + "{{" * MAX_UNCLOSED_OPENERS)
    literal = "{% raw %}" + "{{ " * MAX_UNCLOSED_OPENERS + "{% endraw %}"
    assert compile_template(literal).render() == "{{ " * MAX_UNCLOSED_OPENERS


@pytest.mark.parametrize(
    ("source", "message"),
    [
        # Liquid bounds each loop; all loops of a render together are bounded too (6,900 such
        # sibling loops fit in a template: ~17 minutes of CPU).
        ("{% for i in (1..60000) %}{% endfor %}" * 2, "more than 100,000 loop iterations in all"),
        # A range outside a loop was not bounded at all (10**12 would take the memory).
        ("{{ (1..100001) | join | size }}", "a range of 100,001 items (at most 100,000)"),
        ("{% assign r = (0..n) %}{{ r | size }}", "a range of 1,000,000,000,001 items"),
    ],
)
def test_a_render_is_bounded_as_a_whole(source: str, message: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(message)):
        render(source, {"n": 10**12}, html=False)


def test_the_largest_loop_and_range_still_render() -> None:
    assert render("{% for i in (1..100000) %}{% endfor %}ok", {}, html=False) == "ok"
    assert render("{{ (1..100000) | size }}", {}, html=False) == "100000"


def test_a_render_stops_when_its_cpu_budget_runs_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A condition costs time without writing or assigning anything: here each of 100,000
    iterations scans a list of 100,000 items (~10**10 steps, hours). The budget is spent as each
    node renders, so the render stops once its CPU time is used up."""
    monkeypatch.setattr(templates, "RENDER_CPU_SECONDS", 0.2)
    source = (
        '{% assign l = (1..100000) | join: "," | split: "," %}'
        '{% for i in (1..100000) %}{% if l contains "x" %}y{% endif %}{% endfor %}'
    )
    with pytest.raises(TemplateError, match=re.escape("rendering took more than 0.2 s of CPU")):
        render(source, {}, html=False)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        # Squaring 22 times made a 4-million-bit integer: ~10 s of CPU inside one node, and a
        # chain of 128 more products in the output took minutes, on the worker's event loop.
        (
            "{% assign x = 2 %}" + "{% assign x = x | times: x %}" * 22 + "{{ x }}",
            "an integer of more than 4,096 bits",
        ),
        # 12,000 replacements of 12,000 characters: 144 million characters (~300 MB).
        (
            '{% assign s = "' + "x" * 12_000 + '" %}{{ s | replace: "x", s | size }}',
            "a string of more than 4,194,304 characters",
        ),
        (
            '{% assign s = "' + "x" * 100_001 + '" %}{{ s | split: "" | size }}',
            "a list of more than 100,000 items",
        ),
        (
            '{% assign l = "a,b" | split: "," %}'
            + "{% assign l = l | concat: l %}" * 17
            + "{{ l | size }}",
            "a list of more than 100,000 items",
        ),
    ],
)
def test_what_a_filter_makes_is_bounded(source: str, message: str) -> None:
    with pytest.raises(TemplateError, match=re.escape(message)):
        render(source, {}, html=False)


def test_a_join_too_long_is_refused_before_it_is_made() -> None:
    """5,000 empty items joined by 150,000 characters made 750 MB before the check saw it."""
    source = '{{ "' + "," * 2_000 + '" | split: "," | join: "' + "x" * 10_000 + '" | size }}'
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError, match="a string of more than 4,194,304 characters"):
            render(source, {}, html=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024  # the 20 MB string was never made


def test_filters_inside_one_output_spend_the_cpu_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """One output of a 4 Mi-character string through 3,000 filters is one node: the budget,
    read as nodes render, never saw the ~20 s it took."""
    monkeypatch.setattr(templates, "RENDER_CPU_SECONDS", 0.2)
    text = "x" * 2000
    source = f'{{{{ "{text}" | replace: "x", "{text}"' + " | upcase | downcase" * 3000 + " }}"
    with pytest.raises(TemplateError, match=re.escape("rendering took more than 0.2 s of CPU")):
        render(source, {}, html=False)


def test_bounded_filters_still_take_their_context_and_arguments() -> None:
    source = (
        '{{ contact.name | escape }} {{ contact.tags | join: ", " }} {{ contact.tags | first }} '
        '{{ "2024-01-02" | date: "%Y" }} {{ "a b" | url_encode }} {{ 3 | times: 4 | plus: 1 }} '
        '{{ "a-b" | replace: "-", "+" }} {{ "a,b" | split: "," | last }}'
    )
    context = {"contact": {"name": "<A>", "tags": ["x", "y"]}}
    assert render(source, context, html=True) == "&lt;A&gt; x, y x 2024 a+b 13 a+b b"
