"""Cluster: SWIM + Lifeguard membership, fenced primary election, routing."""
