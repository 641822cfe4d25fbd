"""Compute: the tensor-parallel transformer on ONNX Runtime (graphs, blocks, sampling)."""
