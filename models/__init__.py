"""What an adapter is: the base model, the stacked multi-task layer, adapter types, the BoRA prior, the trainer."""
from .multitask import MultiTaskModel
from .registry import ADAPTERS

__all__ = ["ADAPTERS", "MultiTaskModel"]
