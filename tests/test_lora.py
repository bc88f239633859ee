"""Tests for lora.py: parity with peft on a tiny HF Llama, merging, trainability, adapter files."""

import copy
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lora  # noqa: E402
from lora import (DEFAULT_TARGETS, LoRALinear, apply_lora, load_adapter, lora_state_dict,  # noqa: E402
                  mark_trainable, merge_lora, save_adapter, unmerge_lora)

torch.set_num_threads(2)


# ---------------------------------------------------------------------------------------------
# tiny models

def tiny_hf_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).float().eval()


class TinyAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x):
        return self.o_proj(F.silu(self.q_proj(x)) * self.k_proj(x) + self.v_proj(x))


class TinyMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyBlock(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.attn = TinyAttention(dim)
        self.mlp = TinyMLP(dim, hidden)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class TinyLLM(nn.Module):
    def __init__(self, dim=16, hidden=24, n_layers=2, vocab=11):
        super().__init__()
        self.layers = nn.ModuleList(TinyBlock(dim, hidden) for _ in range(n_layers))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


class TinyVision(nn.Module):
    """Holds a q_proj like the CLIP attention does: it must never be wrapped."""

    def __init__(self, dim=8):
        super().__init__()
        self.patch = nn.Linear(3, dim)
        self.layers = nn.ModuleList([TinyAttention(dim)])

    def forward(self, x):
        x = self.patch(x)
        return x + self.layers[0](x)


class TinyGeoChat(nn.Module):
    """Same module names as our GeoChat model: vision / projector.fc1,fc2 / llm.layers[i].attn|mlp."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.vision = TinyVision(8)
        self.projector = nn.Module()
        self.projector.fc1 = nn.Linear(8, 16)
        self.projector.fc2 = nn.Linear(16, 16)
        self.llm = TinyLLM(16)

    def forward(self, pixels):
        feats = self.vision(pixels)
        return self.llm(self.projector.fc2(F.gelu(self.projector.fc1(feats))))


def randomize_lora(model, seed=1, std=0.1):
    """Give every LoRA B (and A) random values so the update is non-zero and tests can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=gen) * std)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * std)


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


# ---------------------------------------------------------------------------------------------
# parity with peft

def wrap_like_peft(r=8, alpha=16, dropout=0.0):
    """An HF Llama wrapped by us and a deep copy wrapped by peft, sharing peft's (randomized) A/B."""
    peft = pytest.importorskip("peft")
    ours = tiny_hf_llama()
    ref = peft.get_peft_model(copy.deepcopy(ours), peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(DEFAULT_TARGETS)))
    names = apply_lora(ours, r=r, alpha=alpha, dropout=dropout, under="")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in names:
            ref_mod = ref.base_model.model.get_submodule(name)
            ref_mod.lora_B["default"].weight.copy_(torch.randn(ref_mod.lora_B["default"].weight.shape, generator=gen) * 0.1)
            our_mod = ours.get_submodule(name)
            our_mod.lora_A.copy_(ref_mod.lora_A["default"].weight)
            our_mod.lora_B.copy_(ref_mod.lora_B["default"].weight)
    return ours, ref, names


def test_apply_lora_matches_peft_eval():
    ours, ref, names = wrap_like_peft()
    assert len(names) == 2 * 7 and "lm_head" not in " ".join(names)
    assert names[0] == "model.layers.0.self_attn.q_proj"
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref.eval(), ours.eval()
        ref_logits = ref(input_ids=ids).logits
        our_logits = ours(input_ids=ids).logits
        with ref.disable_adapter():
            base_logits = ref(input_ids=ids).logits
    diff = (our_logits - ref_logits).abs().max().item()
    print(f"\nmax |ours - peft| logits (eval): {diff:.3e}; LoRA effect {(ref_logits - base_logits).abs().max():.3e}")
    assert diff < 1e-5
    assert (ref_logits - base_logits).abs().max() > 1e-2  # the adapter really changes the output


class UniformDropout(nn.Module):
    """Inverted dropout drawn as ours draws it (a uniform per element, kept where >= p), to give peft our masks."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x * (torch.rand_like(x) >= self.p) / (1 - self.p)


def test_apply_lora_matches_peft_train_dropout_and_grads():
    ours, ref, names = wrap_like_peft(dropout=0.3)
    for name in names:  # the same masks on both sides: peft's dropout draws from the RNG as ours does
        ref.base_model.model.get_submodule(name).lora_dropout["default"] = UniformDropout(0.3)
    ref.train(), ours.train()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    ref_logits = ref(input_ids=ids).logits
    torch.manual_seed(123)
    our_logits = ours(input_ids=ids).logits
    diff = (our_logits - ref_logits).abs().max().item()
    torch.manual_seed(7)
    other = ours(input_ids=ids).logits
    assert (other - our_logits).abs().max() > 1e-4  # dropout is active, so the match is not trivial
    (ref_logits ** 2).mean().backward()
    (our_logits ** 2).mean().backward()
    grad_diff = 0.0
    for name in names:
        ref_mod, our_mod = ref.base_model.model.get_submodule(name), ours.get_submodule(name)
        grad_diff = max(grad_diff, (ref_mod.lora_A["default"].weight.grad - our_mod.lora_A.grad).abs().max().item(),
                        (ref_mod.lora_B["default"].weight.grad - our_mod.lora_B.grad).abs().max().item())
        assert our_mod.base.weight.grad is None
    print(f"\nmax |ours - peft| logits (train, dropout 0.3): {diff:.3e}; LoRA grads: {grad_diff:.3e}")
    assert diff < 1e-5
    assert grad_diff < 1e-5


def test_lora_dropout_rate_and_unbiased():
    """Each input is kept with probability 1 - p and the kept ones are scaled by 1 / (1 - p), as nn.Dropout."""
    p, n = 0.3, 4000
    layer = LoRALinear(nn.Linear(n, 1, bias=False), r=1, alpha=1, dropout=p)
    with torch.no_grad():
        layer.base.weight.zero_()
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(1.0)
    x = torch.ones(1, n)
    torch.manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([layer(x) for _ in range(200)]).flatten()  # (1 - p)^-1 * number kept
        kept = draws * (1 - p) / n
        assert (kept - (1 - p)).abs().max() < 0.04  # 5.5 sigma of one draw of 4000
        assert abs(draws.mean().item() / n - 1.0) < 0.005  # unbiased: the mean equals the eval output
        layer.eval()
        assert layer(x).item() == n  # no dropout in eval
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), r=1, alpha=1, dropout=1.0)


def test_fresh_wrap_is_identity_and_peft_init():
    model = tiny_hf_llama()
    ids = torch.arange(10)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    apply_lora(model, r=4, alpha=16, dropout=0.05, under="")
    for m in lora_modules(model).values():
        assert m.lora_A.shape == (4, m.base.in_features) and m.lora_B.shape == (m.base.out_features, 4)
        assert m.lora_A.abs().max() <= 1 / math.sqrt(m.base.in_features) and m.lora_A.abs().max() > 0
        assert torch.count_nonzero(m.lora_B) == 0 and m.scale == 4.0
        assert not m.base.weight.requires_grad
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


# ---------------------------------------------------------------------------------------------
# merging

def test_merge_unmerge_and_merge_lora():
    model = tiny_hf_llama()
    apply_lora(model, r=8, alpha=16, dropout=0.05, under="")
    randomize_lora(model)
    model.eval()
    base_weights = {n: m.base.weight.detach().clone() for n, m in lora_modules(model).items()}
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merge_lora(model, replace=False)
        assert all(m.merged for m in lora_modules(model).values())
        merged = model(input_ids=ids).logits
        assert len(unmerge_lora(model)) == 14
        restore = max((m.base.weight - base_weights[n]).abs().max().item() for n, m in lora_modules(model).items())
        again = model(input_ids=ids).logits
        names = merge_lora(model)
        plain = model(input_ids=ids).logits
    diff = (merged - unmerged).abs().max().item()
    plain_diff = (plain - unmerged).abs().max().item()
    print(f"\nmerged vs unmerged: {diff:.3e}; unmerge restores base within {restore:.3e}; "
          f"merge_lora plain model: {plain_diff:.3e}")
    assert diff < 1e-5 and plain_diff < 1e-5 and restore < 1e-6
    assert torch.allclose(again, unmerged, atol=1e-6)
    assert len(names) == 14 and not lora_modules(model)
    for name in names:
        assert type(model.get_submodule(name)) is nn.Linear
    assert not any("lora" in k or ".base." in k for k in model.state_dict())
    assert set(model.state_dict()) == set(tiny_hf_llama().state_dict())


def test_bf16_base_with_fp32_lora():
    torch.manual_seed(0)
    base = nn.Linear(32, 24, bias=True)
    ref = copy.deepcopy(base)
    layer = LoRALinear(base.to(torch.bfloat16), r=4, alpha=8, dropout=0.0, lora_dtype=torch.float32)
    randomize_lora(layer)
    assert layer.lora_A.dtype == torch.float32 and layer.base.weight.dtype == torch.bfloat16
    x = torch.randn(3, 32)
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    expected = ref(x) + x @ layer.lora_A.T @ layer.lora_B.T * 2.0
    assert (y.float() - expected).abs().max() < 0.05
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.base.weight.grad is None
    with torch.no_grad():
        layer.merge()
        merged = layer(x.to(torch.bfloat16))
    assert layer.base.weight.dtype == torch.bfloat16
    assert (merged.float() - expected).abs().max() < 0.05


def test_autocast_keeps_the_lora_branch_in_the_activation_dtype():
    """bf16 autocast over fp32 LoRA masters: no fp32 copy of the activations is saved for backward (mask included)."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 64, bias=False).to(torch.bfloat16), r=4, alpha=8, dropout=0.1)
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    big_fp32 = [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.numel() >= x.numel()]
    assert big_fp32 == [], big_fp32
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_compile_fullgraph_no_graph_breaks():
    layer = LoRALinear(nn.Linear(8, 8, bias=False).to(torch.bfloat16), r=4, alpha=8, dropout=0.1)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)  # raises on any graph break
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    compiled(x).float().sum().backward()
    assert layer.lora_A.grad is not None
    layer.eval()
    with torch.no_grad():
        expected = layer(x)
        layer.merge()
        assert torch.allclose(compiled(x).float(), expected.float(), atol=0.05)


# ---------------------------------------------------------------------------------------------
# GeoChat-style model: target selection and trainability

def test_targets_restricted_to_llm_and_mark_trainable():
    model = TinyGeoChat()
    names = apply_lora(model, r=4, alpha=16, dropout=0.05)
    assert len(names) == 2 * 7 and all(n.startswith("llm.layers.") for n in names)
    assert type(model.vision.layers[0].q_proj) is nn.Linear  # same attribute name, outside `llm`
    assert type(model.llm.lm_head) is nn.Linear and type(model.projector.fc1) is nn.Linear
    mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.{ab}" for n in names for ab in ("lora_A", "lora_B")}
    expected |= {f"projector.fc{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    assert trainable == expected
    model.train()
    model(torch.randn(2, 5, 3)).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in expected)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in expected)


def test_bare_model_skips_vision_tower():
    model = TinyGeoChat()
    names = apply_lora(model, r=4, alpha=16, under="")
    assert names and not any(n.startswith("vision.") for n in names)
    assert type(model.vision.layers[0].q_proj) is nn.Linear


def test_apply_lora_errors():
    model = TinyGeoChat()
    with pytest.raises(ValueError, match=r"no nn.Linear named one of \['query', 'key'\] under 'llm'"):
        apply_lora(model, targets=("query", "key"))
    with pytest.raises(ValueError, match="under 'language_model'"):
        apply_lora(model, under="language_model")
    with pytest.raises(ValueError, match="lm_head is never"):
        apply_lora(model, targets=("q_proj", "lm_head"))
    apply_lora(model)
    with pytest.raises(ValueError, match="already wrapped"):
        apply_lora(model)


# ---------------------------------------------------------------------------------------------
# adapter files

def make_adapter(tmp_path):
    model = TinyGeoChat(seed=0)
    apply_lora(model, r=4, alpha=16, dropout=0.05)
    randomize_lora(model)
    out = tmp_path / "adapter"
    save_adapter(model, out, r=4, alpha=16, dropout=0.05, targets=DEFAULT_TARGETS)
    return model, out


def test_save_load_round_trip(tmp_path):
    model, out = make_adapter(tmp_path)
    assert sorted(os.listdir(out)) == ["adapter.safetensors", "adapter_config.json"]  # no temp files left
    config = json.loads((out / "adapter_config.json").read_text())
    assert config == {"format": "geochat-pytorch-lora", "r": 4, "alpha": 16, "dropout": 0.05,
                      "targets": list(DEFAULT_TARGETS), "under": "llm", "extra_modules": ["projector"]}
    tensors = load_file(str(out / "adapter.safetensors"))
    assert "projector.fc1.weight" in tensors and "projector.fc2.bias" in tensors  # the reference's bug, fixed
    assert "llm.layers.0.attn.q_proj.lora_A" in tensors and len(tensors) == 14 * 2 + 4
    assert not any(k.startswith(("vision.", "llm.lm_head")) or ".base." in k for k in tensors)

    fresh = TinyGeoChat(seed=0)  # same frozen base weights ...
    with torch.no_grad():
        fresh.projector.fc1.weight.mul_(0.5)  # ... but a different projector, which the adapter must overwrite
    wrapped = load_adapter(fresh, out)
    assert len(wrapped) == 14 and lora_modules(fresh)["llm.layers.1.mlp.down_proj"].dropout == 0.05
    model.eval(), fresh.eval()
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    # loading into an already wrapped model works as well
    again = TinyGeoChat(seed=0)
    apply_lora(again, r=4, alpha=16, dropout=0.05)
    load_adapter(again, out)
    again.eval()
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_save_adapter_infers_config(tmp_path):
    model = TinyGeoChat()
    apply_lora(model, r=4, alpha=8, dropout=0.1, targets=("q_proj", "v_proj"))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["alpha"], config["dropout"], config["targets"]) == (4, 8, 0.1, ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="r=4, alpha=8 but r=64"):
        save_adapter(model, tmp_path, r=64, alpha=16)


def test_projector_only_adapter(tmp_path):
    """No LoRA modules (train.py --mode projector): the adapter holds the projector alone and loads without wrapping."""
    model = TinyGeoChat(seed=0)
    with torch.no_grad():
        model.projector.fc1.weight.mul_(2.0)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["targets"], config["extra_modules"]) == (0, [], ["projector"])
    assert all(k.startswith("projector.") for k in load_file(str(tmp_path / "adapter.safetensors")))
    fresh = TinyGeoChat(seed=0)
    assert load_adapter(fresh, tmp_path) == [] and not lora_modules(fresh)
    assert torch.equal(fresh.projector.fc1.weight, model.projector.fc1.weight)
    with pytest.raises(ValueError, match="no LoRALinear modules .* and no extra_modules"):
        save_adapter(model, tmp_path, extra_modules=())


def test_load_adapter_errors(tmp_path):
    _, out = make_adapter(tmp_path)
    weights = out / "adapter.safetensors"
    good = load_file(str(weights))

    with pytest.raises(FileNotFoundError, match="nowhere/adapter_config.json"):
        load_adapter(TinyGeoChat(), tmp_path / "nowhere")

    weights.rename(out / "moved")
    with pytest.raises(FileNotFoundError, match="adapter weights not found: .*adapter.safetensors"):
        load_adapter(TinyGeoChat(), out)
    (out / "moved").rename(weights)

    save_file({**good, "llm.layers.0.attn.q_proj.lora_C": torch.zeros(2)}, str(weights))
    with pytest.raises(ValueError, match=r"adapter.safetensors does not match.*unexpected keys: llm.layers.0.attn.q_proj.lora_C"):
        load_adapter(TinyGeoChat(), out)

    save_file({k: v for k, v in good.items() if k != "projector.fc2.bias"}, str(weights))
    with pytest.raises(ValueError, match=r"missing keys: projector.fc2.bias"):
        load_adapter(TinyGeoChat(), out)

    save_file({**good, "llm.layers.1.mlp.up_proj.lora_B": torch.zeros(24, 5)}, str(weights))
    with pytest.raises(ValueError, match=r"mis-shaped keys: llm.layers.1.mlp.up_proj.lora_B \(file \(24, 5\), model \(24, 4\)\)"):
        load_adapter(TinyGeoChat(), out)

    save_file(good, str(weights))
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "format": "peft"}))
    with pytest.raises(ValueError, match="format is 'peft'"):
        load_adapter(TinyGeoChat(), out)


@pytest.mark.parametrize("field, model_config", [
    ("alpha", dict(r=4, alpha=8, dropout=0.05)),  # kept silently before: scale 8 / 4 = 2 instead of 16 / 4 = 4
    ("dropout", dict(r=4, alpha=16, dropout=0.0)),
    ("r", dict(r=2, alpha=8, dropout=0.05)),  # the same scale alpha / r, still refused
])
def test_load_adapter_refuses_other_lora_config(tmp_path, field, model_config):
    _, out = make_adapter(tmp_path)  # r=4, alpha=16, dropout=0.05
    model = TinyGeoChat(seed=0)
    apply_lora(model, **model_config)
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    adapter_value = {"r": 4, "alpha": 16, "dropout": 0.05}[field]
    with pytest.raises(ValueError, match=rf"load_adapter: .*adapter does not match the model's LoRA layers: .*"
                                         rf"{field}={adapter_value} in the adapter but {field}={model_config[field]} "
                                         rf"in llm.layers.0.attn.q_proj"):
        load_adapter(model, out)
    assert all(torch.equal(v, before[k]) for k, v in lora_state_dict(model).items())  # nothing was loaded


def test_load_adapter_refuses_merged_layers(tmp_path):
    source, out = make_adapter(tmp_path)
    model = TinyGeoChat(seed=0)
    apply_lora(model, r=4, alpha=16, dropout=0.05)
    randomize_lora(model, seed=5)
    merge_lora(model, replace=False)  # the base weights now hold the seed-5 update
    with pytest.raises(ValueError, match=r"llm.layers.0.attn.q_proj is merged .*call unmerge_lora\(model\) before loading .*adapter"):
        load_adapter(model, out)
    unmerge_lora(model)
    load_adapter(model, out)
    source.eval(), model.eval()
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_adapter_file_is_named(tmp_path, damage):
    _, out = make_adapter(tmp_path)
    weights = out / "adapter.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"not a safetensors file")
    with pytest.raises(ValueError, match=r"adapter/adapter.safetensors: cannot read adapter weights"):
        load_adapter(TinyGeoChat(), out)


# ---------------------------------------------------------------------------------------------
# wrappers: torch.compile names and FSDP2 DTensors

def test_lora_state_dict_strips_compile_prefix(tmp_path):
    model = TinyGeoChat()
    compiled = torch.compile(model)  # never run: only the `_orig_mod.` names matter here
    names = apply_lora(compiled, r=4, alpha=16)  # the prefix does not hide `llm.` either
    assert names[0] == "llm.layers.0.attn.q_proj"
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    mark_trainable(compiled)
    assert model.projector.fc1.weight.requires_grad and not model.vision.patch.weight.requires_grad
    state = lora_state_dict(compiled)
    assert not any("_orig_mod" in k for k in state)
    assert state.keys() == lora_state_dict(model).keys()
    assert "llm.layers.1.mlp.gate_proj.lora_B" in state and "projector.fc1.weight" in state
    assert lora.clean_name("_orig_mod.llm._orig_mod.layers.0._checkpoint_wrapped_module.attn") == "llm.layers.0.attn"
    save_adapter(compiled, tmp_path)
    fresh = TinyGeoChat()
    load_adapter(torch.compile(fresh), tmp_path)
    assert torch.equal(fresh.llm.layers[0].attn.q_proj.lora_A, model.llm.layers[0].attn.q_proj.lora_A)


def test_fsdp2_single_rank_mixed_dtype(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = TinyGeoChat()
    model.llm.to(torch.bfloat16)
    apply_lora(model, r=4, alpha=16, dropout=0.0, lora_dtype=torch.float32)
    randomize_lora(model)
    mark_trainable(model)
    expected = {k: v.clone() for k, v in lora_state_dict(model).items()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for layer in model.llm.layers:
            fully_shard(layer)  # a group with frozen bf16 base weights and fp32 LoRA params
        fully_shard(model)
        assert isinstance(model.llm.layers[0].attn.q_proj.lora_A, DTensor)
        x = torch.randn(2, 5, 3)
        model.projector.fc2.register_forward_hook(lambda m, i, out: out.to(torch.bfloat16))
        model(x).float().sum().backward()
        assert model.llm.layers[0].attn.q_proj.lora_B.grad is not None
        state = lora_state_dict(model)
    finally:
        dist.destroy_process_group()
    assert state.keys() == expected.keys()
    for k, v in state.items():
        assert type(v) is torch.Tensor and torch.equal(v, expected[k]), k
