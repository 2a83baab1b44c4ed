"""Exceptions that mean "the user gave bad input": the CLI prints them as one line and exits 2."""
from models.base import BaseModelError
from models.device import DeviceError
from models.trainer import DivergedError, ResumeError
from tasks.registry import ConfigError

from .router import RouterError
from .store import StoreError


class RemoteError(Exception):
    """Push or pull failed: the Hub refused or was unreachable, or a pulled repo does not fit here."""


USER_ERRORS = (ConfigError, StoreError, BaseModelError, ResumeError, DivergedError, RemoteError, RouterError,
               DeviceError)
