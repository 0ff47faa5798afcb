"""Game-side Python client for the npctalk ZeroMQ server (protocol: bindings/PROTOCOL.md)."""
