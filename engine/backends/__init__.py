"""Backends: one implementation of the model's ops each (torch_ref, cpu_int8, cuda)."""
