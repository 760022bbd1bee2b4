"""Pretraining feasibility: FLOPs, memory per GPU, time, cost, compute-optimal sizing and a
DeepSpeed plan, computed before any GPU-hour is spent."""
