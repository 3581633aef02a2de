"""The starter: runs jobs as their owners and serves ssh sessions into them; opens no port."""

from ._daemon import Starter

__all__ = ["Starter"]
