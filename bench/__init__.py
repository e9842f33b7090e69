"""Benchmarks of every ECLoss backend against the reference and the SDPA route.

``python -m bench --help`` runs them; ``bench/NOTES.md`` keeps the cost model, the
results and what each kernel version changed; ``bench/gpu_check.sh`` is the one-shot
script for a GPU machine.
"""
