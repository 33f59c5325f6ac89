"""moc-node: the ModelOps Coordinator node agent."""

__version__ = "0.1.0"
