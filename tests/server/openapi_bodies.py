"""What every omni server's OpenAPI document must show: each omni route's request bodies, every field described."""

from __future__ import annotations

from typing import Any

#: route -> {content type: schema name}
OMNI_BODIES = {
    "/v1/images/generations": {"application/json": "ImageGenerationRequest"},
    "/v1/images/edits": {"multipart/form-data": "ImageEditForm", "application/json": "ImageEditRequest"},
    "/v1/videos": {"application/json": "VideoCreateRequest", "multipart/form-data": "VideoCreateForm"},
    "/v1/chat/completions": {"application/json": "ChatImageRequest"},
}


def assert_omni_bodies(document: dict[str, Any], knobs: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check `document` (GET /openapi.json) for the omni bodies; `knobs`: the served model's own
    request fields, which every body schema must carry too. Returns the document's schemas."""
    schemas = document["components"]["schemas"]
    for path, bodies in OMNI_BODIES.items():
        body = document["paths"][path]["post"]["requestBody"]
        assert {kind: c["schema"]["$ref"].rsplit("/", 1)[-1] for kind, c in body["content"].items()} == bodies
        for name in bodies.values():
            props = schemas[name]["properties"]
            assert all(p.get("description") for p in props.values()), name  # every field described
            assert set(knobs) <= set(props), (name, set(knobs) - set(props))
    return schemas
