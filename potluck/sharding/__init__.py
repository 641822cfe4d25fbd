"""Sharding: tensor-parallel plan, shard extraction, the TP engine and the star all-reduce."""
