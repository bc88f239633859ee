"""The CLIP vision transformer (ViT-L/14 and friends), written out in plain PyTorch.

Matches HF `CLIPVisionModel`
(https://github.com/huggingface/transformers/blob/main/src/transformers/models/clip/modeling_clip.py):
a bias-free conv patch embedding, a learned class embedding, learned position embeddings,
`pre_layrnorm`, pre-LN blocks with `quick_gelu`, attention through `F.scaled_dot_product_attention`.

GeoChat reads the hidden state of layer -2 (the input of the last block, no post-LayerNorm) with
the class token dropped, so the tower is built with only the blocks that feature needs.
Position embeddings trained at one grid (24x24 at 336 px) are resized to another (36x36 at 504 px)
by `interpolate_pos_embed`, GeoChat's procedure.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ViTConfig:
    image_size: int = 336  # the resolution the position embeddings were trained at
    patch_size: int = 14
    width: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    mlp_dim: int = 4096
    norm_eps: float = 1e-5
    act: str = "quick_gelu"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_name(cls, name: str) -> "ViTConfig":
        """The config of a named tower in VIT_CONFIGS."""
        if name not in VIT_CONFIGS:
            raise ValueError(f"unknown ViT config {name!r}; known: {', '.join(VIT_CONFIGS)}")
        return cls(**VIT_CONFIGS[name])

    @classmethod
    def from_hf(cls, hf: dict) -> "ViTConfig":
        """The config from an HF CLIP vision config dict (or a full CLIP config's `vision_config`)."""
        hf = hf.get("vision_config", hf)
        return cls(
            image_size=hf.get("image_size", 224),
            patch_size=hf.get("patch_size", 32),
            width=hf.get("hidden_size", 768),
            n_layers=hf.get("num_hidden_layers", 12),
            n_heads=hf.get("num_attention_heads", 12),
            mlp_dim=hf.get("intermediate_size", 3072),
            norm_eps=hf.get("layer_norm_eps", 1e-5),
            act=hf.get("hidden_act", "quick_gelu"),
        )

    def to_dict(self) -> dict:
        """Plain dict, for our own config.json."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_hf(self) -> dict:
        """An HF `CLIPVisionConfig` dict (the inverse of from_hf), for a CLIP directory's config.json."""
        return {"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"], "image_size": self.image_size,
                "patch_size": self.patch_size, "hidden_size": self.width, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "intermediate_size": self.mlp_dim, "layer_norm_eps": self.norm_eps,
                "hidden_act": self.act, "num_channels": 3}


VIT_CONFIGS = {
    "ViT-L/14-336": dict(image_size=336, patch_size=14, width=1024, n_layers=24, n_heads=16, mlp_dim=4096),
    "ViT-L/14": dict(image_size=224, patch_size=14, width=1024, n_layers=24, n_heads=16, mlp_dim=4096),
}

# Hub ids of `mm_vision_tower` that we can build without their directory.
HUB_VISION_TOWERS = {
    "openai/clip-vit-large-patch14-336": "ViT-L/14-336",
    "openai/clip-vit-large-patch14": "ViT-L/14",
}

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
}


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resize (1 + g*g, C) position rows to (1 + grid*grid, C): class row kept, bicubic align_corners=True."""
    n_patches, width = pos_embed.shape[0] - 1, pos_embed.shape[1]
    old = math.isqrt(n_patches)
    if old * old != n_patches:
        raise ValueError(f"position embedding has {pos_embed.shape[0]} rows: not 1 + a square grid")
    if old == grid:
        return pos_embed
    class_row, patch_rows = pos_embed[:1], pos_embed[1:]
    patch_grid = patch_rows.float().reshape(1, old, old, width).permute(0, 3, 1, 2)  # (1, C, g, g)
    patch_grid = F.interpolate(patch_grid, size=(grid, grid), mode="bicubic", align_corners=True)  # (1, C, grid, grid)
    patch_rows = patch_grid.permute(0, 2, 3, 1).reshape(grid * grid, width).to(pos_embed.dtype)
    return torch.cat([class_row, patch_rows], dim=0)


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.o_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (p(x).view(B, N, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, C/H)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.act not in ACTIVATIONS:
            raise ValueError(f"unknown vision activation {cfg.act!r}; known: {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[cfg.act]
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def blocks_for_layer(n_layers: int, select_layer: int) -> int:
    """How many blocks produce HF's hidden_states[select_layer] (hidden_states has n_layers + 1 entries)."""
    n = select_layer if select_layer >= 0 else n_layers + 1 + select_layer
    if not 0 <= n <= n_layers:
        raise ValueError(f"select_layer {select_layer} is outside a {n_layers}-layer tower")
    return n


class VisionTower(nn.Module):
    """Patch features (B, grid*grid, width) of hidden state `select_layer`, class token dropped."""

    def __init__(self, cfg: ViTConfig, image_size: int | None = None, select_layer: int = -2):
        super().__init__()
        self.cfg = cfg
        self.image_size = image_size or cfg.image_size
        if self.image_size % cfg.patch_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of the patch size {cfg.patch_size}")
        self.grid = self.image_size // cfg.patch_size
        self.select_layer = select_layer
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embed = nn.Parameter(torch.zeros(cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1 + self.grid * self.grid, cfg.width))
        self.pre_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(blocks_for_layer(cfg.n_layers, select_layer)))

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        B, _, H, W = images.shape
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"images are {H}x{W}, the vision tower expects {self.image_size}x{self.image_size}")
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype))  # (B, C, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid*grid, C)
        x = torch.cat([self.class_embed.expand(B, 1, -1).to(x.dtype), x], dim=1)  # (B, 1 + grid*grid, C)
        x = self.pre_norm(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return x[:, 1:]  # (B, grid*grid, C)
