"""GET /metrics: Prometheus text format (OpenMetrics when the scraper asks for it) of :mod:`api.metrics`.

Who may read it: a request with credentials needs the ``metrics`` scope (an admin's token made with
``--scope metrics`` is the scraper's); a request without any is answered only from this host (loopback, as
uvicorn sees the client: behind a reverse proxy on this host, the X-Forwarded-For address it sets), unless
GATEWAY_HTTP__METRICS_FROM_LOOPBACK is false. Anything else: 401 without credentials, 403 without the scope.
"""

from __future__ import annotations

from ipaddress import IPv6Address, ip_address

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from api.security import NotAuthenticated, OptionalPrincipal, client_address

SCOPE = "metrics"

router = APIRouter(tags=["metrics"])


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (the client's IP address as uvicorn gives it) is this host's loopback."""
    try:
        addr = ip_address((host or "").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def metrics_reader(request: Request, principal: OptionalPrincipal) -> None:
    """A dependency: credentials with the metrics scope, or none from loopback (see the module docstring)."""
    if principal is None:
        if request.app.state.settings.http.metrics_from_loopback and is_loopback(client_address(request)):
            return
        raise NotAuthenticated(
            f"/metrics needs a bearer token with the {SCOPE} scope, or a request from this host itself"
        )
    if SCOPE not in principal.scopes:
        held = ", ".join(sorted(principal.scopes)) or "none"
        raise HTTPException(403, detail=f"/metrics needs the {SCOPE} scope; this {principal.via} has {held}")


@router.get("/metrics", response_class=Response, dependencies=[Depends(metrics_reader)])
def metrics(request: Request) -> Response:  # a plain def: the database figures are read in a thread
    """Every process's counters and histograms and the database's figures, read now."""
    registry: CollectorRegistry = request.app.state.metrics
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(registry), media_type=content_type)
