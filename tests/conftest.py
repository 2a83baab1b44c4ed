"""Shared fixtures: a tiny random Llama with an in-process tokenizer, and a tiny registry on it."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

TOPICS = {
    "cooking": "stir the soup add salt bake bread with butter and garlic taste the sauce slowly",
    "finance": "the bank raised rates stocks fell bonds rallied investors sold shares in the market",
    "sport": "the team scored a goal in the final match the coach praised the striker and keeper",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_tokenizer():
    """A word-level tokenizer over the TOPICS vocabulary (no download needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in TOPICS.values() for w in text.split()} | set("abcdefghijklmnopqrstuvwxyz"))
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, "<bos>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>")


def tiny_batcher(n_tasks: int):
    """A balanced MixedBatcher over ``n_tasks`` tasks of 6 random 10-token examples each."""
    from tasks.batching import MixedBatcher, Tokenized

    gen = torch.Generator().manual_seed(0)
    data = {t: Tokenized([torch.randint(4, 128, (10,), generator=gen).tolist() for _ in range(6)], [0] * 6)
            for t in range(n_tasks)}
    return MixedBatcher(data, batch_size=4, sampling="balanced", seed=0, pad_id=1)


def tiny_lm(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, pad_token_id=1, eos_token_id=2, bos_token_id=3,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama + tokenizer: usable as `base_model:` in a tasks.yaml."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_lm().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def write_tiny_registry(root: Path, model_dir: Path, **overrides) -> Path:
    """tasks.yaml with one task per TOPICS entry (jsonl data of shuffled sentences) on the tiny model."""
    import random

    rng = random.Random(0)
    tasks = []
    for name, text in TOPICS.items():
        words = text.split()
        rows = [{"text": " ".join(rng.sample(words, 8))} for _ in range(30)]
        path = root / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        tasks.append({"name": name, "data": {"path": path.name}})
    cfg = {
        "base_model": str(model_dir), "store": "store", "prior": {"tau": 10.0},
        "training": {"steps": 6, "batch_size": 6, "max_length": 16, "lr": 0.01, "checkpoint_every": 2,
                     "eval_docs": 4, "seed": 0},
        "adapter": {"type": "lora", "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "tasks": tasks,
    }
    for k, v in overrides.items():
        cfg[k] = v
    path = root / "tasks.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def tiny_registry(tmp_path, tiny_model_dir) -> Path:
    """Path of a fresh tasks.yaml (3 tasks, jsonl data) on the tiny model, in tmp_path."""
    return write_tiny_registry(tmp_path, tiny_model_dir)


@pytest.fixture
def tiny_hub(tiny_registry) -> Path:
    """A trained tiny hub: returns the tasks.yaml path; the store is beside it in ./store."""
    from hub.workspace import Workspace

    Workspace(tiny_registry).train(progress=False)
    return tiny_registry


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on shared cores idle pool threads spin."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- the local Hub server (tests/hubserver.py), shared by the push/pull test modules ----------------------
TOKEN = "hf_test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The Hub server as the default endpoint; online mode, a private download cache, a token for the CLI."""
    from huggingface_hub import constants

    from hubserver import HubServer, use_as_default_endpoint

    hub = HubServer()
    with hub as url, use_as_default_endpoint(url), pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        mp.setenv("HF_TOKEN", TOKEN)
        yield hub


@pytest.fixture(scope="module")
def api(server):
    from huggingface_hub import HfApi

    return HfApi(endpoint=server.url, token=TOKEN)


@pytest.fixture(scope="module")
def origin(tmp_path_factory, tiny_model_dir) -> Path:
    """A trained tiny hub (3 tasks): its tasks.yaml."""
    from hub.workspace import Workspace

    cfg = write_tiny_registry(tmp_path_factory.mktemp("origin"), tiny_model_dir)
    Workspace(cfg).train(progress=False)
    return cfg


@pytest.fixture(scope="module")
def pushed(server, origin):
    """The origin hub pushed to main of a fresh repo and tagged v1: (repo_id, PushResult)."""
    import uuid

    from hub import remote

    repo_id = f"tester/hub-{uuid.uuid4().hex[:8]}"
    return repo_id, remote.push(origin, repo_id, tag="v1", token=TOKEN, endpoint=server.url)
