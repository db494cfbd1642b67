"""Prompt execution on Ray actors (`--ray`): the worker runtime each actor wraps, the pool of
actors, model-affinity scheduling, and the files that travel between server and workers.

Only `pool` and `batch_runner` import Ray, and only main.py's --ray paths import those; without
--ray nothing here imports Ray."""
