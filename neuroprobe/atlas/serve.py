"""``neuroprobe atlas --serve``: the atlas over HTTP on 127.0.0.1, writing missing unit pages on first request."""
from __future__ import annotations

import functools
import re
from http.server import HTTPServer, SimpleHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlparse

from neuroprobe.atlas import tables as T
from neuroprobe.errors import NeuroprobeError

_UNIT = re.compile(r"^/units/([^/]+)/(\d+)\.html$")


class _Handler(SimpleHTTPRequestHandler):
    atlas: Any = None
    by_slug: dict[str, str] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url_path = unquote(urlparse(self.path).path)
        if url_path == "/" + T.LIVE_JS and self.atlas is not None:  # pages learn that every unit's page exists on demand
            body = b"window.ATLAS_LIVE = true;\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
            return
        m = _UNIT.match(url_path)
        if m and self.atlas is not None:
            site = self.by_slug.get(m.group(1))
            path = Path(self.directory) / "units" / m.group(1) / f"{m.group(2)}.html"
            if site is not None and not path.exists():
                try:
                    self.atlas.write_unit(site, int(m.group(2)))
                except NeuroprobeError as err:
                    self.send_error(404, str(err))
                    return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of http.server
        if not self.server.quiet:  # type: ignore[attr-defined]
            super().log_message(format, *args)


def make_server(atlas, port: int = 8000, *, quiet: bool = False) -> HTTPServer:
    """An HTTP server for ``atlas`` (an :class:`~neuroprobe.atlas.build.Atlas`) bound to 127.0.0.1 only."""
    handler = type("AtlasHandler", (_Handler,), {"atlas": atlas, "by_slug": {T.slug(s): s for s in atlas.sites}})
    try:
        server = HTTPServer(("127.0.0.1", port), functools.partial(handler, directory=str(atlas.out)))
    except OSError as err:
        raise NeuroprobeError(f"cannot serve on 127.0.0.1:{port} ({err.strerror}); choose another --port.") from None
    server.quiet = quiet  # type: ignore[attr-defined]
    return server


def serve(atlas, port: int = 8000, *, quiet: bool = False, ready: Callable[[str], None] | None = None) -> None:
    """Serve ``atlas`` until interrupted; ``ready(url)`` is called once the socket listens."""
    server = make_server(atlas, port, quiet=quiet)
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
    if ready is not None:
        ready(url)
    try:
        server.serve_forever()
    finally:
        server.server_close()
