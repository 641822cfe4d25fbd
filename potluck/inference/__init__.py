"""Inference: backends (llama.cpp, ONNX Runtime), model resolution and validation, generation."""
