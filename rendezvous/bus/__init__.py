"""The bus: every Redis connection, the hot path's lean client, stream retention, the embedded
server."""
