__version__ = "0.1.0"

from flashmoe.errors import FlashMoeError  # noqa: E402
from flashmoe.protocol.client import (  # noqa: E402
    Client,
    ClientError,
    DaemonNotRunning,
    RequestRejected,
    Timeout,
)

__all__ = [
    "Client",
    "ClientError",
    "DaemonNotRunning",
    "FlashMoeError",
    "RequestRejected",
    "Timeout",
    "__version__",
]
