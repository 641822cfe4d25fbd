"""Orchestration: TP groups (threads, processes, swarm peers), backends, placement, workers."""
