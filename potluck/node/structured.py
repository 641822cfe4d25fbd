"""Structured output and tool choice as llama.cpp grammars (OpenAI ``response_format``, ``tools``).

The request models of these parameters, and the GBNF (llama.cpp's grammar format) each one turns
into, carried as :attr:`potluck.routing.request.SamplingParams.grammar`:

* ``{"type": "json_object"}``: llama.cpp's JSON grammar (``grammars/json.gbnf``, shipped as
  ``llama_cpp.llama_grammar.JSON_GBNF``): any JSON object.
* ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``: the schema converted
  by llama-cpp-python's port of llama.cpp's ``json_schema_to_grammar.py``
  (``llama_cpp.llama_grammar.json_schema_to_gbnf``). A schema it cannot convert is a 400 naming
  ``response_format``.
* ``tool_choice`` ``"required"`` or a named function: a JSON object ``{"name": ..., "arguments":
  {...}}`` whose ``arguments`` follow the tool's ``parameters`` schema (one call), which
  :mod:`potluck.node.tool_calls` parses back. ``"auto"`` constrains nothing; ``"none"`` hides the tools.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from potluck.errors import RequestError

MAX_TOOLS = 128
_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JsonSchemaSpec(_Strict):
    """``response_format.json_schema``."""

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI ``response_format``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class FunctionDef(_Strict):
    """``tools[i].function``."""

    name: Annotated[str, Field(pattern=_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    """One entry of OpenAI ``tools``."""

    type: Literal["function"]
    function: FunctionDef


class _NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: _NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


_LITERAL_ESCAPES = {"\r": "\\r", "\n": "\\n", '"': '\\"', "\\": "\\\\"}


def _schema_to_gbnf(schema: Any, prop_order: list[str] | None) -> str:
    """llama-cpp-python's ``json_schema_to_gbnf``, with each JSON literal (``const``, ``enum``,
    property names) matched as the exact JSON text: non-ASCII characters raw, as llama.cpp's own
    converter writes them (``common/json-schema-to-grammar.cpp``), and backslashes escaped for GBNF.
    The 0.3.36 port leaves backslashes unescaped, so a string holding ``"`` or ``\\`` became a
    grammar llama.cpp cannot parse, and one holding a newline asked for a raw (invalid JSON) one."""
    from llama_cpp.llama_grammar import SchemaConverter

    class _Converter(SchemaConverter):
        def _format_literal(self, literal: str) -> str:
            try:  # JSON text of a constant (else one plain character, from ``not_literal``)
                literal = json.dumps(json.loads(literal), ensure_ascii=False)
            except ValueError:
                pass
            return '"' + "".join(_LITERAL_ESCAPES.get(c, c) for c in literal) + '"'

    order = {name: i for i, name in enumerate(prop_order or [])}
    converter = _Converter(prop_order=order, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(json.loads(json.dumps(schema)), "stdin"), "")
    gbnf: str = converter.format_grammar()
    return gbnf


def schema_grammar(schema: Any, param: str, prop_order: list[str] | None = None) -> str:
    """GBNF for a JSON schema.

    Raises:
        RequestError: the converter rejects the schema (``param`` names where it came from).
    """
    try:
        gbnf = _schema_to_gbnf(schema, prop_order)
    except (AssertionError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as exc:
        raise RequestError(f"invalid JSON schema in '{param}': {exc}", param=param) from exc
    # llama-cpp-python 0.3.36's port lets a string hold raw control characters (``[^"\\]``), which
    # is not JSON; llama.cpp's current converter excludes them, as RFC 8259 section 7 requires.
    return gbnf.replace('char ::= [^"\\\\]', 'char ::= [^"\\\\\\x7F\\x00-\\x1F]')


def response_format_grammar(fmt: ResponseFormat | None, param: str = "response_format") -> str | None:
    """The grammar ``response_format`` asks for (``None`` for plain text).

    Raises:
        RequestError: ``json_schema`` without a schema, or a schema that cannot be converted.
    """
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        from llama_cpp.llama_grammar import JSON_GBNF

        return JSON_GBNF
    if fmt.json_schema is None or not fmt.json_schema.schema_:
        raise RequestError(f"'{param}' of type json_schema needs json_schema.schema", param=param)
    return schema_grammar(fmt.json_schema.schema_, param)


def _call_schema(tool: ToolDef) -> dict[str, Any]:
    params = tool.function.parameters or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": params},
        "required": ["name", "arguments"],
    }


def tool_grammar(tools: list[ToolDef] | None, choice: ToolChoice | None) -> str | None:
    """The grammar a ``tool_choice`` asks for: one call of any tool (``required``) or of the named
    one; ``None`` for ``auto``/``none``. Every tool's ``parameters`` schema is checked either way.

    Raises:
        RequestError: ``tool_choice`` without ``tools``, an unknown named function, or a tool whose
            ``parameters`` schema cannot be converted (``tools[i].function.parameters``).
    """
    if not tools:
        if choice is not None and choice != "none":
            raise RequestError("'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise RequestError(f"at most {MAX_TOOLS} tools", param="tools")
    schemas = [_call_schema(t) for t in tools]
    for i, s in enumerate(schemas):  # a bad parameters schema is a 400 even when nothing is forced
        schema_grammar(s, f"tools[{i}].function.parameters", ["name", "arguments"])
    if choice is None or choice in ("auto", "none"):
        return None
    if isinstance(choice, NamedToolChoice):
        chosen = [s for s, t in zip(schemas, tools, strict=True) if t.function.name == choice.function.name]
        if not chosen:
            raise RequestError(
                f"'tool_choice' names {choice.function.name!r}, which is not in 'tools'", param="tool_choice"
            )
        return schema_grammar(chosen[0], "tools", ["name", "arguments"])
    return schema_grammar({"anyOf": schemas} if len(schemas) > 1 else schemas[0], "tools", ["name", "arguments"])


def tools_json(tools: list[ToolDef] | None, choice: ToolChoice | None) -> str | None:
    """The tool definitions to render into the prompt (OpenAI's JSON), ``None`` when there are
    none or ``tool_choice`` is ``"none"``."""
    if not tools or choice == "none":
        return None
    return json.dumps([t.model_dump(exclude_none=True) for t in tools], ensure_ascii=False)
