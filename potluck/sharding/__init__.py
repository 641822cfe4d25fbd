"""Sharding: tensor parallelism across devices (TPI-LLM), in four layers, each importing only those below it.

* :mod:`.format`: GGUF tensors, the shard plan, slice extraction, shard files;
* :mod:`.compute`: the ONNX Runtime engine that runs one rank's slices;
* :mod:`.collective`: the star all-reduce, frame channels, session auth, shard transfer;
* :mod:`.orchestration`: groups of ranks (threads, local processes, swarm peers) and backends.

The overlay is reached only through the :class:`~.orchestration.ports.SwarmPort` protocol that
the node wires (see ``docs/LAYERS.md``).
"""
