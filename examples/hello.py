"""The README's tour: the smallest ASGI app, which uvicorn serves on a Unix socket."""


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello from behind fasthttpdir\n"})
