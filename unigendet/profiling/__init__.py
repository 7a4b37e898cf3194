"""Measurement helpers for benchmarks and smoke runs: model FLOPs per training step, a measured matmul
peak for MFU, and random packs laid out exactly like real training packs."""
