"""Every exception potluck raises, in one tree.

Third-party exceptions are translated at the boundary where they enter potluck
(``raise ModelFileError(...) from exc``), so callers only ever catch these::

    PotluckError
    ├── ConfigError                 bad setting, flag or config file
    ├── ModelError
    │   ├── ModelFileError          missing, truncated or non-GGUF file
    │   ├── ModelNotFound           no model of that name here or in the swarm (HTTP 404)
    │   ├── ModelLoading            model still loading (HTTP 503)
    │   └── DownloadError           Hugging Face download failed
    ├── RequestError                bad request parameters (HTTP 400)
    ├── Overloaded                  bounded queue is full (HTTP 429)
    ├── ScopeRefused                the caller's API key lacks a scope (HTTP 403; has ``scope``)
    ├── GenerationError             the backend failed mid-generation
    ├── ShardPlanError              no tensor-parallel plan fits (memory, speeds, geometry)
    ├── NetworkError
    │   ├── ConnectError            could not connect to a peer
    │   ├── TransferError           a connection broke mid-transfer
    │   │   └── PeerFailed          a collective member died, stalled or misbehaved (has ``rank``)
    │   ├── ClosedError             we closed it ourselves
    │   ├── PeerRefused             the peer refused us (admission, policy)
    │   └── ProtocolViolation       garbage, oversized or schema-invalid frame
    └── PrivacyError                sanitization failed; nothing was sent (fail closed)
        └── PolicyRefused           privacy level 'strict' keeps this request on tier <= 1 (HTTP 403)

``PotluckWarning`` is the base of our own warnings; the test suite turns it into errors.
"""

from __future__ import annotations


class PotluckError(Exception):
    """Base of every potluck exception."""


class ConfigError(PotluckError):
    """A setting, flag or config file is invalid."""


class ModelError(PotluckError):
    """Something is wrong with a model."""


class ModelFileError(ModelError):
    """A model file is missing, truncated or not a GGUF file."""


class ModelNotFound(ModelError):
    """No model of the requested name is available."""


class ModelLoading(ModelError):
    """The model is still loading; retry shortly."""


class DownloadError(ModelError):
    """Downloading a model failed."""


class RequestError(PotluckError):
    """A request carries invalid parameters.

    Attributes:
        param: the API parameter at fault (OpenAI's ``error.param``), when one is.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Overloaded(PotluckError):
    """The bounded request queue is full.

    Attributes:
        retry_after: suggested wait before retrying, in seconds.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ScopeRefused(PotluckError):
    """The caller's API key lacks the scope this request needs (``cloud``, ``privacy-override``).

    Attributes:
        scope: the missing scope.
    """

    def __init__(self, message: str, scope: str) -> None:
        super().__init__(message)
        self.scope = scope


class GenerationError(PotluckError):
    """The inference backend failed while generating."""


class ShardPlanError(PotluckError):
    """No tensor-parallel shard plan fits the nodes, or a plan/shard file is inconsistent."""


class NetworkError(PotluckError):
    """Base of transport-level failures."""


class ConnectError(NetworkError):
    """Could not connect to a peer."""


class TransferError(NetworkError):
    """A connection broke while data was in flight (the other side broke it)."""


class PeerFailed(TransferError):
    """A member of a collective group (star all-reduce) died, stalled past its deadline or sent a
    frame that failed length, sequence or size checks.

    Attributes:
        rank: rank of the failed member in its group (0 is the master).
    """

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank

    def __reduce__(self) -> tuple[type[PeerFailed], tuple[str, int]]:
        return (type(self), (str(self), self.rank))


class ClosedError(NetworkError):
    """The resource was closed by us."""


class PeerRefused(NetworkError):
    """The peer refused the request (admission or policy)."""


class ProtocolViolation(NetworkError):
    """A frame was malformed, oversized or failed schema validation."""


class PrivacyError(PotluckError):
    """Sanitization failed; the request was not sent anywhere."""


class PolicyRefused(PrivacyError):
    """The privacy policy forbids sending this request to the chosen destination; nothing was sent."""


class PotluckWarning(UserWarning):
    """Base of potluck's own warnings."""
