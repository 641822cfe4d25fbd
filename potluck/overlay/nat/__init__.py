"""NAT traversal for the overlay (issue 4), on py-libp2p 0.8's circuit relay v2, DCUtR and AutoNAT.

* :mod:`.autonat` - is this node publicly reachable? (AutoNAT v1 dial-back, with a real fresh dial)
* :mod:`.relay` - circuit relay v2: volunteering as a relay (hop, with limits) and keeping
  reservations on relays while unreachable, re-reserving elsewhere when a relay is lost.
* :mod:`.paths` - how each connection runs: direct, hole-punched or relayed (and through which relay).
* :mod:`.traversal` - :class:`NatTraversal`, the one object the overlay service owns: it runs the
  above plus DCUtR (hole punching) in the trio thread and dials peers directly or through a relay.

Everything here runs in the overlay's trio thread (see :mod:`potluck.overlay.bridge`).
"""
