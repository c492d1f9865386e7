"""Benchmarks: tables, not tests. python -m bench.kernels (the mass routes), bench.train (a training
step per route), bench.generate (the sampler against transformers'), bench.memory (what a fine-tune
holds per model size)."""
