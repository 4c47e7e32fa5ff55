"""fastsni: route TLS connections by SNI name to Unix sockets, without decrypting."""

__version__ = "0.1.0"
