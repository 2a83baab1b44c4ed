"""Exceptions that mean "the user gave bad input": the CLI prints them as one line and exits 2."""
from models.base import BaseModelError
from models.trainer import ResumeError
from tasks.registry import ConfigError

from .store import StoreError

USER_ERRORS = (ConfigError, StoreError, BaseModelError, ResumeError)
