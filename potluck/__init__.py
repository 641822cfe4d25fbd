"""potluck: a peer-to-peer runtime for running quantized LLMs on the devices people already own."""

__version__ = "0.1.0"
