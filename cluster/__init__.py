"""Cluster: SWIM + Lifeguard membership, a fenced primary election and routing, as sans-I/O
state machines (membership, election) driven over UDP/TCP by `runner`. Imports no other package
of the node (not actors, transports or moc_node): moc_node wires it to the rest."""
