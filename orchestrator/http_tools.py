"""Tool calling through the model's own chat template and mlx-lm's tool-call parser.

The tools go to the chat template (``Request.tools``); the model then writes its calls between
the markers its tokenizer names (``tool_call_start``/``tool_call_end``), which mlx-lm's parser
for that model family (``tokenizer.tool_parser``) turns into a name and arguments. A model whose
template has no tool markers cannot call tools: such a request is a 400, not a silent prompt
without them.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from flashmoe.orchestrator.http_common import ApiError


class ToolCalls:
    def __init__(self, tokenizer: Any, tools: list[dict]):
        self.tools = tools
        self.start = tokenizer.tool_call_start
        self.end = tokenizer.tool_call_end
        self.parser = tokenizer.tool_parser

    @classmethod
    def for_request(cls, tokenizer: Any, body: dict) -> ToolCalls | None:
        """The request's tools (None if it has none, or ``tool_choice`` is ``none``); a 400 if
        the model cannot call tools or the request asks for a form we do not serve."""
        tools, choice = body.get("tools"), body.get("tool_choice")
        if tools in (None, []) or choice == "none":
            return None
        if not isinstance(tools, list) or not all(
                isinstance(t, dict) and t.get("type") == "function"
                and isinstance(t.get("function"), dict)
                and isinstance(t["function"].get("name"), str) for t in tools):
            raise ApiError("'tools' must be a list of {type: function, function: {name, ...}}",
                           param="tools")
        if choice not in (None, "auto"):
            raise ApiError("only tool_choice 'auto' and 'none' are supported",
                           param="tool_choice", code="unsupported_parameter")
        if not getattr(tokenizer, "has_tool_calling", False):
            raise ApiError("this model's chat template does not support tool calling",
                           param="tools", code="unsupported_parameter")
        return cls(tokenizer, tools)

    def parse(self, text: str) -> tuple[list[dict], str]:
        """(OpenAI ``tool_calls``, the text around them) of a finished reply."""
        calls, rest, pos = [], [], 0
        while (i := text.find(self.start, pos)) >= 0:
            j = text.find(self.end, i + len(self.start))
            if j < 0:
                break  # an unfinished call (out of tokens) stays text
            rest.append(text[pos:i])
            calls.extend(self._parse_one(text[i + len(self.start):j]))
            pos = j + len(self.end)
        rest.append(text[pos:])
        return calls, "".join(rest).strip() if calls else text

    def _parse_one(self, body: str) -> list[dict]:
        try:
            parsed = self.parser(body, self.tools)
        except (ValueError, KeyError, TypeError):
            return []  # not a call the parser can read: dropped, as mlx-lm's server does
        out = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(call, dict) or "name" not in call:
                continue
            args = call.get("arguments", {})
            out.append({"id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                        "type": "function",
                        "function": {"name": call["name"], "arguments": args if isinstance(
                            args, str) else json.dumps(args, ensure_ascii=False)}})
        return out
