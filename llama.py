"""The Llama-2 / Vicuna decoder, written out in plain PyTorch.

Matches HF `LlamaForCausalLM`
(https://github.com/huggingface/transformers/blob/main/src/transformers/models/llama/modeling_llama.py):
RMSNorm, rotary position embeddings in the `rotate_half` convention, SwiGLU MLP, grouped-query
attention when `n_kv_heads < n_heads`, no biases, an untied `lm_head`.

Attention goes through `F.scaled_dot_product_attention`, with `is_causal=True` when no mask is given
and otherwise a boolean (B, 1, T, S) mask where True means "may attend". Only the mask-free calls can
reach the flash kernel on GPU (given fp16/bf16 and head_dim <= 256; flash also serves GQA):
- the full-sequence forward of an unpadded batch, and training on right-padded batches (train.py
  runs it without a mask: causal attention is exact at every labelled position);
- the first, unpadded prefill into the KV cache (cache_pos 0..T-1, attending to those T slots).
A mask rules flash out (SDPA falls back to a kernel that takes one: memory-efficient, math with GQA):
- padded batches (a padded forward, a left-padded prefill) and every prefill after the first;
- every single-token decode step against the KV cache, whose mask selects the filled slots.
scripts/gpu_check.py forces sdpa_kernel(FLASH_ATTENTION) over the first kind (and the vision tower) and
the memory-efficient kernel over the second, so a change that leaves a fast path fails there.
The optional static KV cache (gpt-fast style) is preallocated per layer and written at `cache_pos`; it is
reused while big enough (largest batch and length so far), and the RoPE tables are buffers beside it, so
a compiled decode step keeps the same buffer addresses from call to call.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no GQA)
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, n_heads {self.n_heads} and n_kv_heads {self.n_kv_heads} do not divide")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str) -> "LlamaConfig":
        """The config of a named model in LLAMA_CONFIGS."""
        if name not in LLAMA_CONFIGS:
            raise ValueError(f"unknown Llama config {name!r}; known: {', '.join(LLAMA_CONFIGS)}")
        return cls(**LLAMA_CONFIGS[name])

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """The config from the Llama fields of an HF `config.json`; refuses fields that would change the logits."""
        check_hf_supported(hf)
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            max_seq_len=hf.get("max_position_embeddings", 4096),
        )

    def to_dict(self) -> dict:
        """Plain dict, for our own config.json."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_hf_supported(hf: dict) -> None:
    """Raise ValueError, naming the field and its value, on an HF Llama config this decoder would compute wrongly."""
    # pretraining_tp > 1 is accepted: HF (4.x) only splits the same matmuls into slices, the same logits up to rounding.
    for field in ("rope_scaling", "rope_parameters"):  # transformers 4 / 5 names; rope_theta alone is plain RoPE
        rope = hf.get(field) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{field}={rope!r} is not supported (only plain rotary embeddings: rope_type 'default')")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # both are x * sigmoid(x) in HF
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise ValueError(f"{field}={hf[field]!r} is not supported (the decoder has no biases)")
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, head_dim):
        raise ValueError(f"head_dim={hf['head_dim']!r} is not supported (only hidden_size / num_attention_heads = {head_dim})")


LLAMA_CONFIGS = {
    "vicuna-7b": dict(dim=4096, n_layers=32, n_heads=32, intermediate_size=11008),
    "vicuna-13b": dict(dim=5120, n_layers=40, n_heads=40, intermediate_size=13824),
}


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like HF `LlamaRMSNorm`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one call; the same products as below
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x * rsqrt(mean(x^2) + eps), in float32
        return self.weight * normed.to(x.dtype)  # HF rounds to the input dtype before the weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and signed sin tables (..., head_dim) for integer positions (...), angles in float32 as HF.

    HF rotates with x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1). We return
    sin with its first half negated, so that the rotation is x * cos + roll(x, D/2) * signed_sin:
    the same products, fewer operations.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (..., head_dim/2)
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # (..., head_dim)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys: x * cos + rotate_half(x) * sin."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class KVCache(nn.Module):
    """A static per-layer key/value cache (B, n_kv_heads, max_seq_len, head_dim) written at cache_pos."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at slots cache_pos (T,) of the first B rows; return those rows of the cache."""
        rows = k.shape[0]  # a batch may use fewer rows than the cache holds (the cache is sized for the largest)
        k_cache, v_cache = self.k[:rows], self.v[:rows]  # (B, Hkv, S, D) views: same storage, no copy
        k_cache.index_copy_(2, cache_pos, k)
        v_cache.index_copy_(2, cache_pos, v)
        return k_cache, v_cache


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask=None, cache_pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None and cache_pos is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)  # (B, Hkv, S, D)
            width = T if mask is None else mask.shape[-1]  # no mask: a causal prefill of slots 0..T-1
            k, v = k[:, :, :width], v[:, :, :width]  # attend only to those slots
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.n_kv_heads != self.n_heads
        )  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache_pos=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache_pos)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Token embeddings -> decoder blocks -> final norm -> lm_head."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # cos / signed sin of every position (max_seq_len, head_dim), set with the KV cache (not saved)
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None) -> bool:
        """Make sure every layer has a static KV cache of at least batch_size rows and max_seq_len slots.

        As gpt-fast's setup_caches: a cache that is already big enough (same dtype and device) is kept,
        so its buffers keep their addresses (no CUDA-graph re-recording, no recompilation); a larger one
        replaces it, sized for the largest batch and length asked so far. Returns whether it allocated.
        """
        if max_seq_len > self.cfg.max_seq_len:
            raise ValueError(f"cache of {max_seq_len} positions exceeds the context of {self.cfg.max_seq_len}")
        weight = self.embed_tokens.weight
        dtype, device = dtype or weight.dtype, device or weight.device
        old = self.layers[0].attn.kv_cache
        if old is not None and old.k.dtype == dtype and old.k.device == device:
            if old.k.shape[0] >= batch_size and old.k.shape[2] >= max_seq_len:
                return False
            batch_size, max_seq_len = max(batch_size, old.k.shape[0]), max(max_seq_len, old.k.shape[2])
        for layer in self.layers:
            layer.attn.kv_cache = None  # free the old cache before the new one is allocated
        with torch.inference_mode(False):  # normal tensors: a cache made under inference_mode is reused outside it
            for layer in self.layers:
                layer.attn.kv_cache = KVCache(batch_size, self.cfg.n_kv_heads, max_seq_len, self.cfg.head_dim, dtype, device)
            if self.rope_cos is None or self.rope_cos.dtype != dtype or self.rope_cos.device != device:
                # looked up per step instead of recomputed (the same float32 angles), in the cache's compute dtype
                positions = torch.arange(self.cfg.max_seq_len, device=device)
                self.rope_cos, self.rope_sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, dtype)
        return True

    def hidden_states(self, embeds, positions=None, mask=None, cache_pos=None, checkpoint_blocks: bool = False):
        """Final-norm hidden states (B, T, dim) for input embeddings (B, T, dim).

        positions (B, T): rotary positions (default 0..T-1); mask (B, 1, T, S) bool, None for causal;
        cache_pos (T,): KV-cache slots to write (needs setup_cache); then the mask's last dimension S
        says how many leading cache slots are attended to; without a mask cache_pos must be 0..T-1
        (a first, unpadded prefill: causal attention over those T slots, the flash path).
        checkpoint_blocks recomputes each block in the backward pass (activation checkpointing)
        instead of keeping its activations.
        """
        B, T, _ = embeds.shape
        if positions is None:
            positions = torch.arange(T, device=embeds.device).expand(B, T)
        if self.rope_cos is not None and self.rope_cos.dtype == embeds.dtype:
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, D)
        else:  # RoPE in the compute dtype, the dtype of the embeddings
            cos, sin = (t[:, None] for t in rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype))
        x = embeds
        for layer in self.layers:
            if checkpoint_blocks and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache_pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache_pos)
        return self.norm(x)

    def forward(self, embeds, positions=None, mask=None, cache_pos=None, last_only: bool = False):
        """Logits (B, T, vocab), or (B, 1, vocab) with last_only, for input embeddings (B, T, dim); see hidden_states."""
        x = self.hidden_states(embeds, positions, mask, cache_pos)
        return self.lm_head(x[:, -1:] if last_only else x)
