"""Engines execute the steps the scheduler plans: `sim` (cost model), `torch` (CPU), `gpu` (Triton)."""
