"""Actors: devices, models and their worker processes, placement, resilience, state."""
