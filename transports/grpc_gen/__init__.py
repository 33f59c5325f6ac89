"""Generated code of proto/modelops.proto: do not edit; run `make proto` (proto/generate.py)."""
