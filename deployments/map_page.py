"""The map page: `GET /map` (HTML, JS and CSS served by the app) and a sample capture.

Plain SVG drawn in the browser from `GET /receivers` and the `/predict` answer: no tiles,
no CDN, so the page works with no internet. Included into the ingress app by
`app.include_router(router)`.
"""

from __future__ import annotations

import functools
from importlib import resources

import orjson
from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from serve_app.errors import InvalidInput, http_error
from serve_app.samples import make_samples

SAMPLE_SEED = 15  # a typical scene: all seven receivers, an error near the median
ASSET_TYPES = {
    "map.js": "text/javascript; charset=utf-8",
    "map.css": "text/css; charset=utf-8",
}
# Re-validate on every load so a redeployed page never runs stale script.
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter()


@functools.cache
def _static(name: str) -> bytes:
    return resources.files("serve_app").joinpath("static", name).read_bytes()


@functools.cache
def _sample_body() -> bytes:
    """One simulated standard capture (shipped network, fixed seed) and its truth."""
    s = make_samples(1, SAMPLE_SEED, form="b64")
    lat, lon = s.truth_latlon[0]
    return orjson.dumps({
        # Uncached: a cached answer runs no stage, and the page is there to show them.
        "request": {**s.requests[0], "cache": False},
        "truth": {"latitude": float(lat), "longitude": float(lon)},
        "seed": SAMPLE_SEED,
    })


@router.get("/map", response_class=HTMLResponse, include_in_schema=False)
def map_page() -> HTMLResponse:
    """The live map page."""
    return HTMLResponse(_static("map.html"), headers=NO_CACHE)


@router.get("/map/static/{name}", include_in_schema=False)
def map_asset(name: str) -> Response:
    """The page's script and style sheet (a fixed list: no path from the request is opened)."""
    media_type = ASSET_TYPES.get(name)
    if media_type is None:
        status, body, _ = http_error(InvalidInput("name", f"no asset {name!r}", 404))
        return Response(orjson.dumps(body), status_code=status, media_type="application/json")
    return Response(_static(name), media_type=media_type, headers=NO_CACHE)


@router.get("/map/sample", summary="A simulated capture for the map page")
def map_sample() -> Response:
    """A simulated capture request (`request`) and where its transmitter was (`truth`)."""
    # A sync route: FastAPI runs it in a thread, so the first (simulating) call does not
    # block the event loop; later calls return the cached bytes.
    return Response(_sample_body(), media_type="application/json")
