"""Actors: four rooms (serving, worker, learning, goals) over a few shared modules.

The shared modules at the top (errors, types, names, gguf_synth) import only each other; each
room's `__init__` says what it may import, and tests/test_layers.py holds them to it.
"""
