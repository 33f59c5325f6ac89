"""The worker: its process (`main`, run as `python -m actors.worker.main`), its wire protocol,
client, data channel and routes, native crash reports, and the model backends (GGUF, torch).

Imports only the shared top modules of `actors`.
"""
