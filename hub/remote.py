"""A hub on the Hugging Face Hub: one model repo holds one hub.

    README.md                  model card (hub/card.py)
    borahub.json               manifest (hub/manifest.py): base model id and fingerprint, tau, the adapter
                               groups with every tensor shape, the task specs (as in tasks.yaml) with data
                               size and held-out perplexity, the router files, and sha256 + size of every
                               other file
    hub.json, global.safetensors, <task>/{adapter_config.json, adapter_model.safetensors, native.safetensors}
                               the local store as it is (hub/store.py), so that
                               ``PeftModel.from_pretrained(base, repo, subfolder=task)`` loads a task
    router.json, router.safetensors   the router (checkpoints live outside the store)

Push: hub/push.py. Pull: hub/pull.py, which writes nothing until every check of hub/manifest.py passed.
"""
from .manifest import MANIFEST, Manifest
from .pull import PullResult, pull
from .push import PushResult, push

__all__ = ["MANIFEST", "Manifest", "PullResult", "PushResult", "pull", "push"]
