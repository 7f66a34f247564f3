"""Computation at scale: the mesh and its rules table, and pipeline parallelism."""
