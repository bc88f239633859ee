"""LoRA for GeoChat: wrap the language model's linears, save and load them as one adapter file.

Recipe (the paper's and the reference script's): r=64, alpha=16, dropout 0.05 on every linear of the
language model except lm_head; the projector and the vision tower stay frozen. When a run also
trains the projector, the adapter file holds it too, so an adapter alone restores a tuned model.

Names are matched on the module tree, so the same code serves our GeoChat model (`llm.layers.*`)
and a bare HF LlamaForCausalLM (`model.layers.*`, use `under=""`). Wrapper segments inserted by
torch.compile (`_orig_mod`), activation checkpointing and FSDP1 are ignored in every name.
Runtime dependencies: torch and safetensors only.
"""

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "geochat-pytorch-lora"
# Module names that hold a vision tower: never wrapped when no `under` prefix restricts the search.
VISION_SEGMENTS = ("vision", "vision_tower", "vision_model")
# Name segments that wrappers insert between a module and its children.
WRAPPER_SEGMENTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


class LoRALinear(nn.Module):
    """nn.Linear plus a trainable low-rank update: base(x) + dropout(x) @ A.T @ B.T * alpha / r."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 lora_dtype: torch.dtype | None = None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        self.base = base
        self.base.requires_grad_(False)
        dtype = lora_dtype or torch.float32
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft: B = 0 makes the update start at 0
        self.r = r
        self.alpha = alpha
        self.scale = alpha / r
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the scaled low-rank branch (skipped once merged into the base weight)."""
        out = self.base(x)
        if self.merged:
            return out
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the linears cast; no fp32 copy of x
            x = x.to(self.lora_A.dtype)
        scale = self.scale
        if self.training and self.dropout > 0:
            # Inverted dropout, as nn.Dropout: keep each input with probability 1 - p, scale by 1 / (1 - p).
            if x.device.type == "cpu":
                # A uniform draw turned into a 0/1 mask in place costs less than F.dropout on CPU (forward and
                # backward); the 1 / (1 - p) joins alpha / r. The saved mask has x's dtype (F.dropout: bool).
                x = x * torch.rand_like(x).ge_(self.dropout)
                scale = scale / (1.0 - self.dropout)
            else:  # CUDA / MPS: the fused kernel, a 1-byte bool mask kept for backward, in the activation dtype
                x = F.dropout(x, self.dropout, training=True)
        update = F.linear(F.linear(x, self.lora_A), self.lora_B)
        return torch.add(out, update.to(out.dtype), alpha=scale)  # out + update * scale, one pass

    def delta_weight(self) -> torch.Tensor:
        """The update B @ A * scale in float32, shaped like the base weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into base.weight in place (computed in fp32, stored in the weight's dtype)."""
        if self.merged:
            return
        weight = self.base.weight
        weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from base.weight again (exact in fp32, rounded in bf16/fp16)."""
        if not self.merged:
            return
        weight = self.base.weight
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, merged={self.merged}"


def clean_name(name: str) -> str:
    """Drop wrapper segments (torch.compile's `_orig_mod`, checkpoint/FSDP1 wrappers) from a dotted name."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def _starts_with(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _lora_modules(model: nn.Module) -> list[tuple[str, str, LoRALinear]]:
    """(raw name, clean name, module) for every LoRALinear in the model."""
    return [(raw, clean_name(raw), m) for raw, m in model.named_modules() if isinstance(m, LoRALinear)]


def _replace_module(model: nn.Module, raw_name: str, new: nn.Module) -> None:
    parent_name, _, attr = raw_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def apply_lora(model: nn.Module, r: int = 64, alpha: float = 16, dropout: float = 0.05,
               targets: Iterable[str] = DEFAULT_TARGETS, under: str | None = "llm",
               lora_dtype: torch.dtype | None = None) -> list[str]:
    """Wrap every nn.Linear named in `targets` below `under` in a LoRALinear; return the wrapped names."""
    targets = tuple(targets)
    if "lm_head" in targets:
        raise ValueError("lm_head is never LoRA-wrapped (the recipe adapts every linear of the language model except lm_head)")
    under = under or ""
    matches = []
    for raw, module in model.named_modules():
        name = clean_name(raw)
        parts = name.split(".")
        if not isinstance(module, nn.Linear) or parts[-1] not in targets:
            continue
        if under and not name.startswith(under + "."):
            continue
        if not under and any(part in VISION_SEGMENTS for part in parts):
            continue
        matches.append((raw, name, module))
    if not matches:
        where = f"under '{under}'" if under else "outside the vision tower"
        raise ValueError(f"apply_lora: no nn.Linear named one of {list(targets)} {where} "
                         f"(already wrapped, or wrong `under`/`targets`?)")
    for raw, _, module in matches:
        _replace_module(model, raw, LoRALinear(module, r, alpha, dropout, lora_dtype))
    return [name for _, name, _ in matches]


def mark_trainable(model: nn.Module, train_modules: Iterable[str] = ("projector",)) -> None:
    """Set requires_grad on the LoRA params and on every param under `train_modules`; freeze the rest."""
    train_modules = tuple(train_modules)
    lora_params = {id(p) for _, _, m in _lora_modules(model) for p in (m.lora_A, m.lora_B)}
    for raw, param in model.named_parameters():
        name = clean_name(raw)
        param.requires_grad_(id(param) in lora_params or any(_starts_with(name, mod) for mod in train_modules))


def _adapter_entries(model: nn.Module, extra_modules: Iterable[str]) -> dict[str, torch.Tensor]:
    """Clean name -> live tensor (Parameter or buffer, possibly a DTensor) for everything an adapter holds."""
    extra_modules = tuple(extra_modules)
    entries = {}
    for _, name, module in _lora_modules(model):
        entries[name + ".lora_A"] = module.lora_A
        entries[name + ".lora_B"] = module.lora_B
    for raw, tensor in model.state_dict(keep_vars=True).items():
        name = clean_name(raw)
        if any(_starts_with(name, mod) for mod in extra_modules):
            entries[name] = tensor
    return entries


def lora_state_dict(model: nn.Module, extra_modules: Iterable[str] = ("projector",)) -> dict[str, torch.Tensor]:
    """LoRA A/B tensors plus the extra modules' params, clean names, DTensors gathered (collective under FSDP)."""
    state = {}
    for name, tensor in _adapter_entries(model, extra_modules).items():
        tensor = tensor.detach()
        if hasattr(tensor, "full_tensor"):  # FSDP2 / DTensor shard: every rank must take part
            tensor = tensor.full_tensor()
        state[name] = tensor
    return state


def _is_writer() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def _write_atomically(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, r: int | None = None, alpha: float | None = None,
                 dropout: float | None = None, targets: Iterable[str] | None = None,
                 extra_modules: Iterable[str] = ("projector",), under: str | None = "llm") -> Path:
    """Write adapter.safetensors (LoRA + extra modules) and adapter_config.json atomically; rank 0 writes."""
    modules = _lora_modules(model)
    extra_modules = list(extra_modules)
    if not modules and not extra_modules:
        raise ValueError("save_adapter: the model has no LoRALinear modules (call apply_lora first) and no extra_modules")
    if not modules:  # a projector-only adapter (train.py --mode projector): r = 0, no targets
        r, alpha, dropout, targets = 0, 0, 0.0, []
    first = modules[0][2] if modules else None
    r = first.r if r is None else r
    alpha = first.alpha if alpha is None else alpha
    dropout = first.dropout if dropout is None else dropout
    targets = sorted({name.rsplit(".", 1)[-1] for _, name, _ in modules}) if targets is None else list(targets)
    for _, name, module in modules:
        if (module.r, module.alpha) != (r, alpha):
            raise ValueError(f"save_adapter: {name} has r={module.r}, alpha={module.alpha} but r={r}, alpha={alpha} was given")
    state = lora_state_dict(model, extra_modules)  # collective under FSDP: all ranks call it
    if not _is_writer():
        return Path(out_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.to("cpu").contiguous() for name, t in state.items()}
    config = {"format": ADAPTER_FORMAT, "r": r, "alpha": alpha, "dropout": dropout, "targets": targets,
              "under": under or "", "extra_modules": extra_modules}
    _write_atomically(out_dir / ADAPTER_WEIGHTS,
                      lambda tmp: save_file(tensors, tmp, metadata={"format": ADAPTER_FORMAT}))

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")

    _write_atomically(out_dir / ADAPTER_CONFIG, write_config)
    return out_dir


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    """Parse and check adapter_config.json of an adapter directory."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"adapter config not found: {path}")
    config = json.loads(path.read_text())
    if config.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: format is {config.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    missing = [k for k in ("r", "alpha", "dropout", "targets", "under", "extra_modules") if k not in config]
    if missing:
        raise ValueError(f"{path}: missing fields {missing}")
    return config


def _listing(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _check_lora_layers(model: nn.Module, config: dict, adapter_dir: str | os.PathLike) -> None:
    """Refuse merged LoRA layers, and LoRA layers whose r / alpha / dropout differ from the adapter's config."""
    for _, name, module in _lora_modules(model):
        if module.merged:
            raise ValueError(f"load_adapter: {name} is merged into its base weight, which would keep the old update; "
                             f"call unmerge_lora(model) before loading {adapter_dir}")
        mismatched = [f"{field}={config[field]} in the adapter but {field}={getattr(module, field)} in {name}"
                      for field in ("r", "alpha", "dropout") if config[field] != getattr(module, field)]
        if mismatched:
            raise ValueError(f"load_adapter: {adapter_dir} does not match the model's LoRA layers: {'; '.join(mismatched)} "
                             f"(load it into a model without LoRA layers: they are then created from the adapter's config)")


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, lora_dtype: torch.dtype | None = None) -> list[str]:
    """Wrap the model as the adapter's config says (unless already wrapped alike) and load its tensors strictly."""
    config = read_adapter_config(adapter_dir)
    _check_lora_layers(model, config, adapter_dir)
    weights_path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"adapter weights not found: {weights_path}")
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:  # a truncated or corrupt file: say which one
        raise ValueError(f"{weights_path}: cannot read adapter weights ({type(e).__name__}: {e})") from None
    if _lora_modules(model):
        wrapped = [name for _, name, _ in _lora_modules(model)]
    elif not config["targets"]:  # projector-only adapter: nothing to wrap
        wrapped = []
    else:
        if lora_dtype is None:
            lora_dtype = next((t.dtype for k, t in tensors.items() if k.endswith(".lora_A")), None)
        wrapped = apply_lora(model, r=config["r"], alpha=config["alpha"], dropout=config["dropout"],
                             targets=config["targets"], under=config["under"], lora_dtype=lora_dtype)
    expected = _adapter_entries(model, config["extra_modules"])
    missing = expected.keys() - tensors.keys()
    unexpected = tensors.keys() - expected.keys()
    misshaped = [f"{k} (file {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)})"
                 for k in expected.keys() & tensors.keys() if tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listing(unexpected)}")
        if misshaped:
            problems.append(f"mis-shaped keys: {_listing(misshaped)}")
        raise ValueError(f"{weights_path} does not match the model: " + "; ".join(problems))
    with torch.no_grad():
        for name, target in expected.items():
            if hasattr(target, "full_tensor"):
                raise ValueError(f"load_adapter: {name} is sharded (DTensor); load the adapter before fully_shard")
            target.copy_(tensors[name].to(device=target.device, dtype=target.dtype))
    return wrapped


def merge_lora(model: nn.Module, replace: bool = True) -> list[str]:
    """Merge every LoRALinear into its base weight; with replace, put the plain nn.Linear back in its place."""
    merged = []
    for raw, name, module in _lora_modules(model):
        module.merge()
        if replace:
            _replace_module(model, raw, module.base)
        merged.append(name)
    return merged


def unmerge_lora(model: nn.Module) -> list[str]:
    """Undo merge_lora(replace=False): subtract every merged LoRALinear's update from its base weight."""
    unmerged = []
    for _, name, module in _lora_modules(model):
        if module.merged:
            module.unmerge()
            unmerged.append(name)
    return unmerged
