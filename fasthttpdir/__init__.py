"""fasthttpdir: route HTTP/1.1 requests by Host to per-host Unix sockets."""
