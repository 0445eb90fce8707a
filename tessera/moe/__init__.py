"""Mixture-of-experts: routing traces, ExFlow expert placement, expert parallelism."""
