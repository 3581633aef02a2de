"""The broker: job queue, authorization, capability minting, session rendezvous."""

from ._queue import JobQueue
from ._server import Broker, StateDirBusy, raise_nofile_limit

__all__ = ["Broker", "JobQueue", "StateDirBusy", "raise_nofile_limit"]
