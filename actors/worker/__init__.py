"""The worker: its process (`main`, run as `python -m actors.worker.main`), the seam serving
uses (`handle`: WorkerHandle, RequestChannel, WorkerSpec), the supervisor's side (`client`: start,
stop; `channel`: requests over the Unix socket), the wire (`protocol`, `links`), what the process
measures of itself (`memory`), native crash reports, and the model backends (GGUF, torch).

Imports only the shared top modules of `actors`.
"""
