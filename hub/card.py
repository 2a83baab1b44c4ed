"""The model card (README.md) of a pushed hub, built with huggingface_hub's ModelCard and ModelCardData.

The card is a pure function of the manifest (no dates, no timings), so pushing an unchanged hub leaves
it unchanged and the Hub client skips it like every other unchanged file.
"""
from __future__ import annotations

import os

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

TAGS = ["peft", "lora", "borahub", "bora", "multi-task"]


def _is_repo_id(name: str) -> bool:
    """True for a Hub id such as ``org/model``; False for local folders, which a card must not name."""
    if os.path.isabs(name) or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _data_source(spec: dict) -> str:
    data = spec.get("data") or {}
    if data.get("bbc_news"):
        return f"BBC News: {data['bbc_news']}"
    if data.get("hub"):
        return f"[{data['hub']}](https://huggingface.co/datasets/{data['hub']})"
    return "local file" if data.get("path") else "–"


def build_card(manifest: dict, repo_id: str) -> ModelCard:
    """A model card for the repo: metadata for the Hub, a per-task table, and how to load each task."""
    base = manifest["base_model"]
    datasets = sorted({t["spec"]["data"]["hub"] for t in manifest["tasks"] if (t["spec"].get("data") or {}).get("hub")})
    data = ModelCardData(library_name="peft", base_model=base if _is_repo_id(base) else None, tags=TAGS,
                         pipeline_tag="text-generation", datasets=datasets or None)
    rows = []
    for t in manifest["tasks"]:
        a = t["spec"]["adapter"]
        desc = (t["spec"].get("description") or "").replace("|", "\\|")
        rows.append(f"| `{t['name']}` | {desc} | {a['type']} r={a['rank']} | {_data_source(t['spec'])} | "
                    f"{t.get('n_train', '–')} | {t.get('eval_docs', '–')} | {_fmt(t.get('perplexity'))} | "
                    f"{_fmt(t.get('base_perplexity'))} |")
    first = manifest["tasks"][0]["name"]
    fp = manifest["fingerprint"]
    groups = "\n".join(f"  - `{g['key']}`: {', '.join(f'`{n}`' for n in g['tasks'])}" for g in manifest["groups"])
    body = f"""
# {repo_id.split('/')[-1]}

A BoRA Hub multi-task adapter hub: {len(manifest['tasks'])} task adapters on one frozen
base model, tied by a learned Bayesian prior (BoRA: theta_t ~ N(Theta, 1/tau), tau = {manifest['tau']}).
Each task folder is a plain PEFT LoRA adapter.

- Base model: `{base}` (trained on `{manifest['base_model_name']}`, config hash `{fp.get('config_hash')}`,
  weights hash `{fp.get('weights_hash')}`; `borahub pull` refuses another base model)
- Adapter groups (tasks sharing type, rank and targets, each with its own global adapter Theta):
{groups}

## Tasks

Perplexity is measured on each task's held-out test split ("held-out docs" documents); "base" is the
frozen model without adapters on the same documents.

| task | description | adapter | data | train docs | held-out docs | perplexity | base |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Use

One task in plain PEFT (also servable by vLLM or LoRAX as a LoRA adapter):

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="{first}")
```

The whole hub (all tasks, routing, new tasks trained against the prior):

```bash
borahub pull {repo_id}
borahub eval
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
