"""Text nodes (ComfyUI's utils/string): concatenate, substring, length, case, trim, replace,
contains, compare and the three regular-expression nodes, with Python's string semantics."""

from __future__ import annotations

import re

from engine.context import NodeContext
from engine.node import Boolean, Combo, Input, Int, Node, NodeSchema, Output, String

JOIN_MATCHES = "\n"  # RegexExtract's separator between several matches
CASE_MODES = {"UPPERCASE": str.upper, "lowercase": str.lower, "Capitalize": str.capitalize,
              "Title Case": str.title}
TRIM_MODES = {"Both": str.strip, "Left": str.lstrip, "Right": str.rstrip}
COMPARE_MODES = ("Starts With", "Ends With", "Equal")
EXTRACT_MODES = ("First Match", "All Matches", "First Group", "All Groups")


def _text(name: str) -> Input:
    return String(name, multiline=True)


def _schema(name: str, display_name: str, inputs: tuple[Input, ...],
            output: Output | None = None) -> NodeSchema:
    return NodeSchema(name, inputs, (output or Output("STRING"),), category="utils/string",
                      display_name=display_name, comfy_v3=True)


def regex_flags(case_insensitive: bool, multiline: bool, dotall: bool) -> int:
    flags = re.IGNORECASE if case_insensitive else 0
    flags |= re.MULTILINE if multiline else 0
    return flags | (re.DOTALL if dotall else 0)


def _flag_inputs(optional: bool = False) -> tuple[Input, ...]:
    return (Boolean("case_insensitive", True, optional=optional),
            Boolean("multiline", False, optional=optional),
            Boolean("dotall", False, optional=optional))


class StringConcatenate(Node):
    schema = _schema("StringConcatenate", "Concatenate", (
        _text("string_a"), _text("string_b"),
        String("delimiter", default="", options={"multiline": False})))

    def execute(self, ctx: NodeContext, string_a: str, string_b: str,
                delimiter: str) -> tuple[str]:
        return (delimiter.join((string_a, string_b)),)


class StringSubstring(Node):
    """string[start:end], negative indices counting from the end."""

    schema = _schema("StringSubstring", "Substring",
                     (_text("string"), Input("start", "INT"), Input("end", "INT")))

    def execute(self, ctx: NodeContext, string: str, start: int, end: int) -> tuple[str]:
        return (string[start:end],)


class StringLength(Node):
    schema = _schema("StringLength", "Length", (_text("string"),), Output("INT", "length"))

    def execute(self, ctx: NodeContext, string: str) -> tuple[int]:
        return (len(string),)


class CaseConverter(Node):
    schema = _schema("CaseConverter", "Case Converter",
                     (_text("string"), Combo("mode", tuple(CASE_MODES), combo_style="v3")))

    def execute(self, ctx: NodeContext, string: str, mode: str) -> tuple[str]:
        return (CASE_MODES[mode](string) if mode in CASE_MODES else string,)


class StringTrim(Node):
    """Whitespace removed from both ends, the left or the right."""

    schema = _schema("StringTrim", "Trim",
                     (_text("string"), Combo("mode", tuple(TRIM_MODES), combo_style="v3")))

    def execute(self, ctx: NodeContext, string: str, mode: str) -> tuple[str]:
        return (TRIM_MODES[mode](string) if mode in TRIM_MODES else string,)


class StringReplace(Node):
    schema = _schema("StringReplace", "Replace",
                     (_text("string"), _text("find"), _text("replace")))

    def execute(self, ctx: NodeContext, string: str, find: str, replace: str) -> tuple[str]:
        return (string.replace(find, replace),)


class StringContains(Node):
    schema = _schema("StringContains", "Contains",
                     (_text("string"), _text("substring"), Boolean("case_sensitive", True)),
                     Output("BOOLEAN", "contains"))

    def execute(self, ctx: NodeContext, string: str, substring: str,
                case_sensitive: bool) -> tuple[bool]:
        if not case_sensitive:
            string, substring = string.lower(), substring.lower()
        return (substring in string,)


class StringCompare(Node):
    schema = _schema("StringCompare", "Compare",
                     (_text("string_a"), _text("string_b"),
                      Combo("mode", COMPARE_MODES, combo_style="v3"),
                      Boolean("case_sensitive", True)), Output("BOOLEAN"))

    def execute(self, ctx: NodeContext, string_a: str, string_b: str, mode: str,
                case_sensitive: bool) -> tuple[bool]:
        if not case_sensitive:
            string_a, string_b = string_a.lower(), string_b.lower()
        if mode == "Starts With":
            return (string_a.startswith(string_b),)
        if mode == "Ends With":
            return (string_a.endswith(string_b),)
        return (string_a == string_b,)


class RegexMatch(Node):
    """Whether the pattern is found anywhere (an invalid pattern finds nothing, as in
    ComfyUI)."""

    schema = _schema("RegexMatch", "Regex Match",
                     (_text("string"), _text("regex_pattern")) + _flag_inputs(),
                     Output("BOOLEAN", "matches"))

    def execute(self, ctx: NodeContext, string: str, regex_pattern: str, case_insensitive: bool,
                multiline: bool, dotall: bool) -> tuple[bool]:
        try:
            found = re.search(regex_pattern, string, regex_flags(case_insensitive, multiline,
                                                                  dotall))
        except re.error:
            return (False,)
        return (found is not None,)


def extract(string: str, pattern: str, mode: str, flags: int, group_index: int) -> str:
    """RegexExtract's result; several results are joined by newlines."""
    if mode == "First Match":
        match = re.search(pattern, string, flags)
        return match.group(0) if match else ""
    if mode == "All Matches":
        found = re.findall(pattern, string, flags)
        return JOIN_MATCHES.join(item[0] if isinstance(item, tuple) else item for item in found)
    if mode == "First Group":
        match = re.search(pattern, string, flags)
        if match is None or len(match.groups()) < group_index:
            return ""
        return match.group(group_index) or ""
    if mode == "All Groups":
        return JOIN_MATCHES.join(match.group(group_index) or "" for match in
                                 re.finditer(pattern, string, flags)
                                 if match.groups() and len(match.groups()) >= group_index)
    return ""


class RegexExtract(Node):
    schema = _schema("RegexExtract", "Regex Extract",
                     (_text("string"), _text("regex_pattern"),
                      Combo("mode", EXTRACT_MODES, combo_style="v3")) + _flag_inputs()
                     + (Int("group_index", 1, min=0, max=100),))

    def execute(self, ctx: NodeContext, string: str, regex_pattern: str, mode: str,
                case_insensitive: bool, multiline: bool, dotall: bool,
                group_index: int) -> tuple[str]:
        try:
            return (extract(string, regex_pattern, mode,
                            regex_flags(case_insensitive, multiline, dotall), group_index),)
        except re.error:
            return ("",)


class RegexReplace(Node):
    """Find and replace text using regex patterns (count 0 replaces every match)."""

    schema = _schema("RegexReplace", "Regex Replace",
                     (_text("string"), _text("regex_pattern"), _text("replace"))
                     + _flag_inputs(optional=True)
                     + (Int("count", 0, min=0, max=100, optional=True),))

    def execute(self, ctx: NodeContext, string: str, regex_pattern: str, replace: str,
                case_insensitive: bool = True, multiline: bool = False, dotall: bool = False,
                count: int = 0) -> tuple[str]:
        flags = regex_flags(case_insensitive, multiline, dotall)
        try:
            return (re.sub(regex_pattern, replace, string, count=count, flags=flags),)
        except re.error as exc:
            raise ValueError(f"RegexReplace: {regex_pattern!r} is not a valid regular expression "
                             f"or {replace!r} not a valid replacement ({exc}); fix the "
                             f"pattern") from exc


NODE_TYPES = (StringConcatenate, StringSubstring, StringLength, CaseConverter, StringTrim,
              StringReplace, StringContains, StringCompare, RegexMatch, RegexExtract,
              RegexReplace)
