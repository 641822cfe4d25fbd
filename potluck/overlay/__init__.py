"""The overlay: libp2p host, discovery, DHT, signed CRDT cluster state, RPC and NAT traversal."""
