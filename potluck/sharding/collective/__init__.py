"""Collective and transport: the star all-reduce, the frame channel, session auth, shard transfer."""
