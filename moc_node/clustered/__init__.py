"""A node in a cluster: `ClusteredNode` wraps this host's LocalNode and routes through peers.

One concern a module (membership link, forwarding, placement, restore, peer handler, view);
they may import moc_node.node, cluster and transports, and nothing imports them but the wiring.
"""
