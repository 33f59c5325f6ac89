"""Transports: the legacy ZeroMQ front (zmq_*), the HTTP API (http*) and the peer RPC (peer,
peer_wire), over one action table (dispatch). May import actors and cluster, never moc_node:
the node is reached only through `api.NodeAPI`."""
