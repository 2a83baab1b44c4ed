"""What a task is: the tasks.yaml schema, registry, data sources and mixed-task batches."""
from .registry import ConfigError, add_tasks, load_config, validate
from .schema import AdapterSpec, HubConfig, TaskSpec

__all__ = ["AdapterSpec", "ConfigError", "HubConfig", "TaskSpec", "add_tasks", "load_config", "validate"]
