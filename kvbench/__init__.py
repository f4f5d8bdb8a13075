"""kvbench: compare KV-cache allocation strategies on the same scheduler, model and kernels."""
