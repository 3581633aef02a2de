"""The broker: job queue, authorization, capability minting, session rendezvous."""

from ._queue import JobQueue
from ._server import Broker

__all__ = ["Broker", "JobQueue"]
