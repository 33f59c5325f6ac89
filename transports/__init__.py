"""Transports: the legacy ZeroMQ server, the HTTP API and the peer RPC, over one dispatch table."""
