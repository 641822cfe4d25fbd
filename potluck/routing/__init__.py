"""Routing contracts: what a request is, where it can run, and the router that picks the route.

Shared by every subsystem (ARCHITECTURE.md, "Routing a request"): :mod:`.request` (messages,
sampling parameters, :class:`~.request.GenerationRequest`), :mod:`.route` (the :class:`~.route.Route`
protocol and its events), :mod:`.router` (model name -> route).
"""
