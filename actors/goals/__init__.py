"""Goals: prioritised multi-step plans (train -> evaluate -> gate -> deploy), persisted in SQLite.

One concern per module: `model` holds the frozen types, `plan` the pure decisions (parsing and
validating plans, turning legacy goals into plans, ordering, what a finished step means),
`store` the SQLite file, `executors` the step executors behind one Protocol, `evalset` and
`scoring` the evaluation set and its llama.cpp scoring (run in a helper process), `actor` the
GoalActor that ties them together, `config` the [goals] section, `metrics` its Prometheus names.

Imports the shared top modules of `actors`; `scoring` also uses the worker's
`actors.worker.backends.gguf.open_llama` (in its helper process).
"""
