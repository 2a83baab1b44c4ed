"""The models users bring: tiny random Qwen2, Mistral, Phi-3 (fused qkv_proj / gate_up_proj), Gemma and GPT-2
(Conv1D) configs built in-process, each with ``target_modules: all-linear``: joint training runs, a mixed batch
gives each row its own task's logits, and every exported adapter loads in plain PEFT with the same logits."""
from __future__ import annotations

import pytest
import torch
import yaml
from conftest import tiny_tokenizer, write_tiny_registry

from hub.cli import main
from hub.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = {"vocab_size": 128, "pad_token_id": 1, "eos_token_id": 2, "bos_token_id": 3}


def family_config(name: str):
    import transformers as T

    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "max_position_embeddings": 256, **COMMON}
    return {
        "qwen2": lambda: T.Qwen2Config(num_key_value_heads=2, **small),  # q/k/v with bias
        "mistral": lambda: T.MistralConfig(num_key_value_heads=2, sliding_window=None, **small),
        "phi3": lambda: T.Phi3Config(num_key_value_heads=4, **small),  # fused qkv_proj and gate_up_proj
        "gemma": lambda: T.GemmaConfig(num_key_value_heads=1, head_dim=16, **small),
        "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **COMMON),  # Conv1D
    }[name]()


@pytest.fixture(scope="module", params=["qwen2", "mistral", "phi3", "gemma", "gpt2"])
def family(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    model = AutoModelForCausalLM.from_config(family_config(request.param)).eval()
    model.save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "model")
    cfg = write_tiny_registry(folder, folder / "model")
    raw = yaml.safe_load(cfg.read_text())
    raw["adapter"] = {"type": "lora", "rank": 4, "alpha": 8, "target_modules": "all-linear"}
    raw["training"]["steps"] = 3
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["--config", str(cfg), "train", "--quiet"]) == 0
    return request.param, cfg


def test_all_linear_wraps_every_linear_but_the_head_and_trains(family):
    from models.stacked import StackedLinear

    name, cfg = family
    mtm, _ = Workspace(cfg).trained_model()
    wrapped = {n for n, m in mtm.lm.named_modules() if isinstance(m, StackedLinear)}
    per_layer = {"qwen2": 7, "mistral": 7, "gemma": 7, "phi3": 4, "gpt2": 4}[name]
    assert len(wrapped) == 2 * per_layer and not any("lm_head" in n for n in wrapped)
    g = mtm.groups[0]
    assert g.flat[:-1].sub(g.flat[-1]).abs().max() > 0  # training moved the task adapters off Theta
    if name == "phi3":
        assert {n.rsplit(".", 1)[-1] for n in wrapped} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert g.fan_in_fan_out == (name == "gpt2")


def test_mixed_batch_rows_and_exports_match_plain_peft(family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name, cfg = family
    mtm, _ = Workspace(cfg).trained_model()
    g = mtm.groups[0]  # make the tasks clearly different from each other and from the base model
    gen = torch.Generator().manual_seed(0)
    mtm.set_params({g.key: (0.3 * torch.randn(g.flat[:-1].shape, generator=gen),
                            0.3 * torch.randn(g.flat[-1].shape, generator=gen))})
    store = Workspace(cfg).store
    from hub import store as store_mod

    ids = torch.randint(4, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = mtm(ids, torch.ones_like(ids), torch.tensor([0, 1, 2])).logits
        base = AutoModelForCausalLM.from_pretrained(store.parent / "model").eval()
        plain = base(input_ids=ids).logits
    assert (mixed - plain).abs().max() > 1e-3
    for t in range(3):
        out = tmp_path / f"export-{t}"
        store_mod.write_peft(mtm, t, out)
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(store.parent / "model"),
                                               str(out)).eval()
        with torch.no_grad():
            theirs = peft_model(input_ids=ids[t: t + 1]).logits
        assert (mixed[t: t + 1] - theirs).abs().max() < 1e-4, (name, t)


def test_all_linear_is_spelled_as_peft_does_and_stands_alone():
    from pydantic import ValidationError

    from tasks.schema import AdapterSpec

    assert AdapterSpec(target_modules="all-linear").target_modules == ["all-linear"]
    assert AdapterSpec(target_modules=["all-linear"]).target_modules == ["all-linear"]
    with pytest.raises(ValidationError, match="stands alone"):
        AdapterSpec(target_modules=["all-linear", "q_proj"])


@pytest.mark.parametrize("name, expected", [
    ("qwen2", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("phi3", ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),
    ("gpt2", ["c_attn", "c_fc", "c_proj"]),
])
def test_the_default_targets_mean_each_architectures_projections(name, expected, tmp_path):
    """Left at its default, target_modules adapts every attention and MLP projection under the architecture's
    own names (Phi-3 would otherwise get only o_proj and down_proj, GPT-2 nothing); the export says the same."""
    import json

    from transformers import AutoModelForCausalLM

    from hub.store import write_peft
    from models.multitask import MultiTaskModel
    from models.targets import leaf_names
    from tasks.schema import AdapterSpec

    lm = AutoModelForCausalLM.from_config(family_config(name)).eval()
    mtm = MultiTaskModel(lm, tiny_tokenizer(), name, [("a", AdapterSpec(rank=2, alpha=4))])
    (group,) = mtm.groups
    assert leaf_names(group.layout) == expected
    per_layer = 4 if name == "gpt2" else len(expected)  # GPT-2 has a c_proj in attention and one in the MLP
    assert len(group.layout) == 2 * per_layer  # every projection of both layers
    write_peft(mtm, 0, tmp_path / "a")
    assert sorted(json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]) == expected


def test_an_unknown_architecture_without_the_default_names_gets_all_linear():
    from torch import nn

    from models.targets import ALL_LINEAR, resolve_targets
    from tasks.schema import ALL_PROJECTIONS

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "odd"})()
            self.w_in, self.w_out = nn.Linear(4, 8), nn.Linear(8, 4)

    assert resolve_targets(Odd(), list(ALL_PROJECTIONS)) == [ALL_LINEAR]
    assert resolve_targets(Odd(), ["w_in"]) == ["w_in"]  # what a user names is taken as named
