"""The OpenAPI schema's shared parts: the error shape, the headers (ETag, If-Match,
Idempotency-Key) and the error responses every operation documents, and descriptions for
fields every resource has.

drf-spectacular builds the schema from the views; `NBDWebAutoSchema` adds what DRF cannot see
(errors raised anywhere, headers read in base classes), so each operation documents them the
same way without a decorator on every view.
"""

from __future__ import annotations

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import ResolvedComponent, get_doc

__all__ = ["ERROR_COMPONENT", "NBDWebAutoSchema", "describe_fields"]

ERROR_COMPONENT = "Error"

# DRF's error shape, used by every 4xx and 503 answer of the API.
ERROR_SCHEMA = {
    "type": "object",
    "description": (
        "An error. `detail` says what went wrong. A 400 for bad input instead names each "
        "bad field with its messages (`non_field_errors` for the body as a whole); a field "
        "of a nested object or list maps to an object of the same shape."
    ),
    "properties": {
        "detail": {"type": "string", "description": "What went wrong, for a person to read."},
    },
    "additionalProperties": {
        "description": "A field's error messages (a list of strings, or an object for a "
        "nested field)."
    },
    "example": {"size": ["Shrinking destroys the data past the new end; it needs force."]},
}

ERROR_DESCRIPTIONS = {
    "400": "Bad input: the body or a query parameter is invalid; the fields are named.",
    "401": "No or an invalid API token (or session).",
    "403": "The user lacks the permission for this.",
    "404": "No such object (or the user may not see it).",
    "409": "Conflicts with the object's state: it is in use or being deleted, a job to retry "
    "has not failed, or a request with the same Idempotency-Key is still running.",
    "412": "If-Match does not match the object's current ETag: it changed since it was read.",
    "422": "The Idempotency-Key was used before with a different request.",
    "503": "A service the answer depends on (Redis) is unreachable.",
}

ETAG_HEADER = {
    "schema": {"type": "string"},
    "description": "The object's version. Send it back in If-Match to change or delete only "
    "the version you read, or in If-None-Match to read it again only if it changed.",
}

# A list's (or another answer's) ETag: a digest of the body, for If-None-Match only.
ANSWER_ETAG_HEADER = {
    "schema": {"type": "string"},
    "description": "This answer's version. Send it in If-None-Match to get a 304 (no body) "
    "while the answer is unchanged.",
}

IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "An ETag from an earlier answer: the change is made only if the object is "
    "still that version (412 otherwise). `*` or no header: whatever the version.",
}

IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "ETags from earlier answers: while the answer would still be one of those "
    "versions it is a 304 with no body (keep what you have).",
}

NOT_MODIFIED = {
    "description": "Not modified: If-None-Match names the current version. No body.",
    "headers": {"ETag": ANSWER_ETAG_HEADER},
}

IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "maxLength": 255},
    "description": "A key unique to this request (e.g. a UUID). A retry with the same key "
    "within 24 hours gets the first answer again and changes nothing; the same key with a "
    "different body is refused (422).",
}

# Actions that DRF's viewsets provide, described for any resource.
STANDARD_DESCRIPTIONS = {
    "list": "List {plural}, {ordering}. Filter with the query parameters; paginated with "
    "`limit` and `offset`.",
    "create": "Create a {singular}.",
    "retrieve": "Read one {singular}. The ETag header is its version.",
    "partial_update": "Change some of a {singular}'s fields; the others keep their values. "
    "Send If-Match with the ETag you read to change only that version.",
    "destroy": "Delete a {singular}. Send If-Match with the ETag you read to delete only that "
    "version.",
    "history": "The {singular}'s audit trail: who changed what and when, newest first.",
}

OBJECT_METHODS_WITH_PRECONDITION = ("PATCH", "PUT", "DELETE")


def error_component(registry) -> dict:
    component = ResolvedComponent(
        name=ERROR_COMPONENT, type=ResolvedComponent.SCHEMA, object=ERROR_COMPONENT
    )
    component.schema = ERROR_SCHEMA
    registry.register_on_missing(component)
    return component.ref


class NBDWebAutoSchema(AutoSchema):
    """drf-spectacular's AutoSchema with the API's shared headers and error responses."""

    def get_description(self) -> str:
        # Only the action's own description: class docstrings are for developers.
        action = getattr(self.view, "action", None)
        method = getattr(self.view, action or self.method.lower(), None)
        own = get_doc(method) if method is not None else ""
        template = STANDARD_DESCRIPTIONS.get(action)
        if own or template is None:
            return own
        model = getattr(getattr(self.view, "queryset", None), "model", None)
        if model is None:
            return own
        ordering = ", ".join(model._meta.ordering) if model._meta.ordering else "by ID"
        return template.format(
            singular=model._meta.verbose_name,
            plural=model._meta.verbose_name_plural,
            ordering=f"ordered by {ordering}".replace("-pk", "newest first"),
        )

    def _map_basic_serializer(self, serializer, direction):
        schema = super()._map_basic_serializer(serializer, direction)
        # A component is described by its own class's docstring, never by a base class's
        # (those are about the implementation).
        own = type(serializer).__dict__.get("__doc__")
        if own:
            schema["description"] = get_doc(type(serializer))
        else:
            schema.pop("description", None)
        return schema

    def _is_object_operation(self) -> bool:
        return "{id}" in self.path

    def _takes_precondition(self) -> bool:
        return (
            self._is_object_operation()
            and self.method in OBJECT_METHODS_WITH_PRECONDITION
            and getattr(self.view, "action", None) in ("partial_update", "update", "destroy")
        )

    def _takes_idempotency_key(self) -> bool:
        return self.method == "POST" and getattr(self.view, "idempotent_posts", False)

    def get_operation(self, path, path_regex, path_prefix, method, registry):
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        parameters = operation.setdefault("parameters", [])
        if self._takes_precondition():
            parameters.append(dict(IF_MATCH))
        if self._takes_idempotency_key():
            parameters.append(dict(IDEMPOTENCY_KEY))
        if self._answers_not_modified(operation):
            parameters.append(dict(IF_NONE_MATCH))
            operation["responses"]["304"] = dict(NOT_MODIFIED)
        if not parameters:
            del operation["parameters"]
        responses = operation["responses"]
        self._add_etag_headers(responses)
        ref = error_component(registry)
        for code in self._error_codes(operation):
            responses.setdefault(
                code,
                {
                    "description": ERROR_DESCRIPTIONS[code],
                    "content": {"application/json": {"schema": ref}},
                },
            )
        return operation

    def _answers_not_modified(self, operation: dict) -> bool:
        # Every GET with a body (nbdweb.settings: ConditionalGetMiddleware; objects by their
        # ETag, lists and other answers by a digest of the body).
        return self.method == "GET" and "content" in operation["responses"].get("200", {})

    def _add_etag_headers(self, responses: dict) -> None:
        action = getattr(self.view, "action", None)
        if action in ("retrieve", "create", "partial_update", "update"):
            header = ETAG_HEADER
        elif self.method == "GET":
            header = ANSWER_ETAG_HEADER
        else:
            return
        for code, response in responses.items():
            if code.startswith("2") and "content" in response:
                response.setdefault("headers", {})["ETag"] = dict(header)

    def _error_codes(self, operation: dict) -> list[str]:
        codes = ["401", "403"]
        # A bad header (Idempotency-Key, If-Match) is a 400 too, like a bad query parameter.
        if operation.get("requestBody") or any(
            p["in"] in ("query", "header") for p in operation.get("parameters", [])
        ):
            codes.insert(0, "400")
        if self._is_object_operation():
            codes.append("404")
        if self.method in ("POST", "PATCH", "PUT", "DELETE"):
            codes.append("409")
        if self._takes_precondition():
            codes.append("412")
        if self._takes_idempotency_key():
            codes.append("422")
        codes.extend(getattr(self.view, "schema_error_codes", ()))
        return codes


# Descriptions of the fields that mean the same on every resource; a field's own help_text
# comes first.
COMMON_FIELD_DESCRIPTIONS = {
    "id": "The object's ID.",
    "url": "The object's API address.",
    "name": "A unique name.",
    "description": "Free text for people.",
    "created": "When the object was created.",
    "last_updated": "When the object last changed.",
    "warnings": "Problems worth a look (e.g. an insecure setting); empty when none.",
    "subject": "The certificate's subject (RFC 4514 string).",
    "not_before": "Valid from.",
    "not_after": "Valid until.",
    "count": "How many objects match, in all pages.",
    "next": "The next page's address; null on the last page.",
    "previous": "The previous page's address; null on the first page.",
    "results": "This page's objects.",
}


def describe_fields(result: dict, generator, request, public) -> dict:
    """Postprocessing hook: give the common fields their description where the serializer
    gave none."""
    for schema in result.get("components", {}).get("schemas", {}).values():
        for name, field in schema.get("properties", {}).items():
            if "description" in field or name not in COMMON_FIELD_DESCRIPTIONS:
                continue
            if "$ref" in field or "allOf" in field:
                continue
            field["description"] = COMMON_FIELD_DESCRIPTIONS[name]
    return result
