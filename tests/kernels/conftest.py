"""Kernel tests run on the CPU through Triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton when no GPU is visible."""
