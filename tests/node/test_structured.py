"""``response_format`` / ``tool_choice`` -> GBNF: every grammar compiles with llama.cpp's own grammar
parser and accepts (or rejects) the JSON text it should, walked token by token through llama.cpp's
grammar sampler on the tinyshakespeare fixture's vocabulary (byte tokens 3..258, EOS 2)."""

from __future__ import annotations

import ctypes
import json
import math
from pathlib import Path

import pytest

from potluck.errors import RequestError
from potluck.inference.grammar import MAX_GRAMMAR_CHARS, checked_grammar
from potluck.node.structured import (
    FunctionDef,
    JsonSchemaSpec,
    NamedToolChoice,
    ResponseFormat,
    ToolDef,
    _NamedFunction,
    response_format_grammar,
    tool_grammar,
    tools_json,
)

FIXTURE = Path(__file__).resolve().parents[2] / ".." / "shared" / "models" / "tinyshakespeare-q4_0.gguf"
EOS = 2
BYTE0 = 3  # token id of byte 0x00


@pytest.fixture(scope="module")
def vocab():
    llama_cpp = pytest.importorskip("llama_cpp")
    if not FIXTURE.exists():
        pytest.skip(f"fixture model missing: {FIXTURE}")
    model = llama_cpp.Llama(model_path=str(FIXTURE), vocab_only=True, verbose=False)
    yield model._model.vocab
    model.close()


def _allowed(llama_cpp, sampler, n_vocab: int) -> set[int]:
    arr = (llama_cpp.llama_token_data * n_vocab)(*[llama_cpp.llama_token_data(i, 0.0, 0.0) for i in range(n_vocab)])
    cur = llama_cpp.llama_token_data_array(data=arr, size=n_vocab, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(cur))
    return {arr[i].id for i in range(cur.size) if not math.isinf(arr[i].logit)}


def accepts(vocab, gbnf: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets ``text`` (as byte tokens) through and then allows EOS."""
    import llama_cpp

    checked_grammar(vocab, gbnf)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    assert sampler
    try:
        for byte in text.encode():
            if BYTE0 + byte not in _allowed(llama_cpp, sampler, n_vocab):
                return False
            llama_cpp.llama_sampler_accept(sampler, BYTE0 + byte)
        return EOS in _allowed(llama_cpp, sampler, n_vocab)
    finally:
        llama_cpp.llama_sampler_free(sampler)


def _fmt(schema: dict) -> ResponseFormat:
    return ResponseFormat(type="json_schema", json_schema=JsonSchemaSpec(name="out", schema=schema))


def _tool(name: str, parameters: dict | None = None) -> ToolDef:
    return ToolDef(type="function", function=FunctionDef(name=name, parameters=parameters))


WEATHER = _tool(
    "get_weather",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False},
)
TIME = _tool("get_time", {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]})


# --- response_format ---------------------------------------------------------------------------


def test_text_or_no_format_is_unconstrained():
    assert response_format_grammar(None) is None
    assert response_format_grammar(ResponseFormat(type="text")) is None


def test_json_object_grammar_takes_objects_only(vocab):
    g = response_format_grammar(ResponseFormat(type="json_object"))
    assert g is not None
    assert accepts(vocab, g, '{"a": [1, 2.5, "x"], "b": {"c": null}}')
    assert not accepts(vocab, g, '"just a string"')
    assert not accepts(vocab, g, "{'a': 1}")


def test_json_schema_grammar_enforces_the_schema(vocab):
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    g = response_format_grammar(_fmt(schema))
    assert g is not None
    assert accepts(vocab, g, '{"name": "Ann", "age": 31, "tags": ["a", "b"]}')
    assert accepts(vocab, g, '{"name": "Ann", "age": 31}')
    assert not accepts(vocab, g, '{"name": "Ann"}')  # age required
    assert not accepts(vocab, g, '{"name": "Ann", "age": "31"}')
    assert not accepts(vocab, g, '{"name": "Ann", "age": 31, "tags": ["a", "b", "c"]}')
    assert not accepts(vocab, g, '{"name": "Ann", "age": 31, "extra": 1}')


def test_string_values_exclude_raw_control_characters(vocab):
    g = response_format_grammar(_fmt({"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}))
    assert g is not None
    assert accepts(vocab, g, '{"s": "line\\nbreak"}')
    assert not accepts(vocab, g, '{"s": "line\nbreak"}')  # RFC 8259: control characters must be escaped


@pytest.mark.parametrize("value", ['say "hi"', "back\\slash", "Zürich", "two\nlines", "plain"])
def test_enum_and_const_strings_match_their_exact_json_text(vocab, value):
    """Quotes, backslashes, non-ASCII and newlines in constants (llama-cpp-python 0.3.36's converter
    left backslashes unescaped: llama.cpp could not parse those grammars)."""
    for schema in ({"enum": [value, "other"]}, {"const": value}):
        g = response_format_grammar(_fmt({"type": "object", "properties": {"v": schema}, "required": ["v"]}))
        assert g is not None
        assert accepts(vocab, g, json.dumps({"v": value}, ensure_ascii=False)), (schema, g)
        assert not accepts(vocab, g, json.dumps({"v": value + "x"}, ensure_ascii=False))


def test_property_names_with_quotes_compile(vocab):
    g = response_format_grammar(
        _fmt({"type": "object", "properties": {'a"b': {"type": "integer"}}, "required": ['a"b']})
    )
    assert g is not None and accepts(vocab, g, '{"a\\"b": 1}')


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "foo"},
        {"$ref": "#/definitions/missing"},
        {"$ref": "https://example.com/schema.json"},
        {"type": "string", "pattern": "no anchors"},
        {"type": "object", "properties": "not a map"},
        {"enum": 3},
        {"anyOf": 5},
    ],
)
def test_invalid_schema_is_a_request_error_naming_response_format(schema):
    with pytest.raises(RequestError, match="invalid JSON schema in 'response_format'") as info:
        response_format_grammar(_fmt(schema))
    assert info.value.param == "response_format"


def test_json_schema_without_a_schema_names_response_format():
    with pytest.raises(RequestError) as info:
        response_format_grammar(ResponseFormat(type="json_schema"))
    assert info.value.param == "response_format"
    with pytest.raises(RequestError) as info:
        response_format_grammar(_fmt({}), param="text.format")
    assert info.value.param == "text.format"


# --- tool_choice -------------------------------------------------------------------------------


def test_auto_and_none_constrain_nothing_and_none_hides_the_tools():
    assert tool_grammar([WEATHER], "auto") is None
    assert tool_grammar([WEATHER], None) is None
    assert tool_grammar([WEATHER], "none") is None
    assert tools_json([WEATHER], "none") is None
    assert json.loads(tools_json([WEATHER], "auto") or "")[0]["function"]["name"] == "get_weather"


def test_named_tool_grammar_forces_that_call(vocab):
    choice = NamedToolChoice(type="function", function=_NamedFunction(name="get_weather"))
    g = tool_grammar([WEATHER, TIME], choice)
    assert g is not None
    assert accepts(vocab, g, '{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert not accepts(vocab, g, '{"name": "get_time", "arguments": {"tz": "UTC"}}')
    assert not accepts(vocab, g, '{"name": "get_weather", "arguments": {}}')
    assert not accepts(vocab, g, "Sure, calling get_weather.")


def test_required_tool_grammar_takes_any_one_tool(vocab):
    g = tool_grammar([WEATHER, TIME], "required")
    assert g is not None
    assert accepts(vocab, g, '{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    assert accepts(vocab, g, '{"name": "get_time", "arguments": {"tz": "CET"}}')
    assert not accepts(vocab, g, '{"name": "get_time", "arguments": {"tz": "PST"}}')
    assert not accepts(vocab, g, '{"name": "rm", "arguments": {}}')


def test_required_single_tool_without_parameters(vocab):
    g = tool_grammar([_tool("ping")], "required")
    assert g is not None and accepts(vocab, g, '{"name": "ping", "arguments": {}}')


def test_tool_choice_errors_name_their_parameter():
    with pytest.raises(RequestError) as info:
        tool_grammar(None, "required")
    assert info.value.param == "tool_choice"
    with pytest.raises(RequestError) as info:
        tool_grammar([WEATHER], NamedToolChoice(type="function", function=_NamedFunction(name="nope")))
    assert info.value.param == "tool_choice" and "'nope'" in str(info.value)
    with pytest.raises(RequestError) as info:
        tool_grammar([WEATHER, _tool("bad", {"type": "foo"})], "auto")  # checked even when nothing is forced
    assert info.value.param == "tools[1].function.parameters"


# --- checked_grammar ---------------------------------------------------------------------------


@pytest.mark.parametrize("gbnf", ["root ::= (", 'root ::= "a" undefined-rule', "not a grammar", 'start ::= "a"'])
def test_unparsable_grammar_is_a_request_error_not_a_crash(vocab, gbnf):
    with pytest.raises(RequestError, match="could not parse") as info:
        checked_grammar(vocab, gbnf)
    assert info.value.param == "grammar"


def test_oversized_grammar_is_refused_before_parsing(vocab):
    with pytest.raises(RequestError, match="exceeds") as info:
        checked_grammar(vocab, 'root ::= "' + "a" * MAX_GRAMMAR_CHARS + '"')
    assert info.value.param == "grammar"
