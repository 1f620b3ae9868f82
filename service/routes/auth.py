"""The optional API key of the prediction routes."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.app import ClientError


def require_api_key(request: Request) -> None:
    """When an API key is set, demand 'Authorization: Bearer <key>'."""
    key = request.app.state.service.settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ClientError(401, "unauthorized", "this route needs the header 'Authorization: Bearer <API key>'")
