"""Learning jobs: LoRA, full fine-tuning, DPO and distillation on the GGUF models the node serves.

The pieces, one concern each: `gguf_io` reads and dequantizes a GGUF's tensors, `tokenizer`
tokenizes with the model's own vocabulary through llama.cpp, `llama_torch` is a torch forward
pass with llama.cpp's arithmetic, `lora` adds low-rank adapters, `export` writes adapters and
whole models back as GGUF, `datasets` validates JSONL, `trainers` run the loops, `jobs` persists
jobs in SQLite, `training` runs one job, `job_process` is the child process a job runs in,
`job_supervisor` forks it from a fork server and watches it from the node, and `actor`
schedules jobs. torch is imported only by the modules that need it (the optional extra
`moc-node[torch]`), and never in the node's process.

Imports the shared top modules of `actors`, and two helpers from other rooms:
`actors.serving.estimate.read_gguf_header` and `actors.worker.client.describe_exit`.
"""
