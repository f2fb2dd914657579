"""The floor under the gateway's overhead: the same HTTP server and upstream
client with nothing in between.

An ASGI app on uvicorn (uvloop, the gateway's httptools protocol, one worker,
no access log: as `tollgate gateway` runs) that forwards every
request to one upstream over the gateway's own upstream connections
(`gateway.upstream.proxy.new_connections`) and relays the answer: whole, or chunk
by chunk when the upstream streams. No auth, quotas, routing, queue, usage
or logs. What it adds over calling the upstream directly is what any proxy
built on this stack pays for the extra hop on the machine at hand;
`bench/gateway_overhead.py` measures it beside the gateway.

    python -m bench.bare_proxy --port 9100 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

from gateway.api.server_protocol import CoalescingHttpToolsProtocol
from gateway.upstream.http1 import Http1Pool
from gateway.upstream.proxy import new_connections

_JSON = [(b"content-type", b"application/json")]
_UPSTREAM_HEADERS = {"content-type": "application/json"}


def build_app(upstream: str) -> Any:
    """The bare proxy's ASGI app, forwarding to `upstream`."""
    session: Http1Pool | None = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    session = new_connections()
                    await send({"type": "lifespan.startup.complete"})
                else:
                    if session is not None:
                        await session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": _JSON})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        assert session is not None
        r = await session.request(
            "POST",
            upstream,
            scope["path"],
            body,
            _UPSTREAM_HEADERS,
            connect_timeout_s=5.0,
            first_byte_timeout_s=60.0,
        )
        kind = r.headers.get("content-type", "application/json").encode()
        if r.headers.get("transfer-encoding", "").lower() == "chunked":
            start = {"type": "http.response.start", "status": r.status}
            await send({**start, "headers": [(b"content-type", kind)]})
            try:
                while chunk := await r.chunk():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finally:
                if r.ended:
                    r.release()
                else:
                    r.close()
            await send({"type": "http.response.body", "body": b""})
            return
        data = await r.read()
        headers = [(b"content-type", kind), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": r.status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    return app


def main() -> None:
    """Serve the bare proxy until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL of the upstream")
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.upstream.rstrip("/")),
        host="127.0.0.1",
        port=args.port,
        lifespan="on",
        http=CoalescingHttpToolsProtocol,
        proxy_headers=False,  # as `tollgate gateway` serves
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
