"""The API's JSON parser: DRF's, with a body nested too deeply answered as a 400."""

from __future__ import annotations

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

__all__ = ["NBDWebJSONParser"]


class NBDWebJSONParser(JSONParser):
    """json's decoder recurses once per `[` or `{`: 100,000 of them exhaust the interpreter's
    recursion limit. No API body nests more than a few levels, so that is a malformed body."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - the body is nested too deeply.") from None
