"""An emulated internet for tests and benchmarks: namespaces, a public segment, NAT routers.

See :mod:`tests.netem.internet` for the topology and :mod:`tests.netem.netns` for running
processes and opening sockets inside a namespace.
"""

from tests.netem.internet import PREFIX, Home, Internet, NatType, cleanup_stale
from tests.netem.netns import Namespace, NetemError, in_namespace, missing_requirements

__all__ = [
    "PREFIX",
    "Home",
    "Internet",
    "Namespace",
    "NatType",
    "NetemError",
    "cleanup_stale",
    "in_namespace",
    "missing_requirements",
]
