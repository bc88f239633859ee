"""GeoChat: CLIP vision tower -> mlp2x_gelu projector -> Llama/Vicuna decoder, and its loaders.

Matches the reference LLaVA-style `GeoChatLlamaForCausalLM` and HF `LlavaForConditionalGeneration`
(https://github.com/huggingface/transformers/blob/main/src/transformers/models/llava/modeling_llava.py):
the prompt's placeholder id (-200) is replaced by the projected patch features of one image.

`GeoChat.from_pretrained(dir)` reads every layout this project knows: the GeoChat / LLaVA-1.5
release (sharded `.bin` or `.safetensors`, vision tower embedded with 577 or 1297 position rows or
in its own CLIP directory), HF `llava-hf` (transformers 4.x and 5.x key names) and our own
single-file safetensors. The model is built on the meta device and the weights are assigned from
memory-mapped files, so loading needs little more memory than the weights themselves.
"""

import ctypes
import json
import mmap
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import quant
from llama import Llama, LlamaConfig
from vit import HUB_VISION_TOWERS, VisionTower, ViTConfig, interpolate_pos_embed

IMAGE_TOKEN_ID = -200  # placeholder id in the prompt, replaced by the image features (the reference's IMAGE_TOKEN_INDEX)
IGNORE_INDEX = -100  # label value that the loss ignores
NATIVE_FORMAT = "geochat-pytorch"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}  # command-line names
PROJECTOR_TYPES = ("mlp2x_gelu",)


@dataclass
class GeoChatConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    llm: LlamaConfig = field(default_factory=LlamaConfig)
    image_size: int = 504  # the resolution the model sees (position embeddings resized to it)
    select_layer: int = -2  # which hidden state of the vision tower feeds the projector
    projector: str = "mlp2x_gelu"
    quantization: dict | None = None  # {"mode": "int8"|"int4", "group_size": G} for a quantised decoder (quant.py)

    def __post_init__(self):
        if self.projector not in PROJECTOR_TYPES:
            raise ValueError(f"unknown projector type {self.projector!r}; supported: {', '.join(PROJECTOR_TYPES)}")

    @property
    def n_image_tokens(self) -> int:
        return (self.image_size // self.vision.patch_size) ** 2

    @classmethod
    def from_name(cls, name: str) -> "GeoChatConfig":
        """The config of a named model in GEOCHAT_CONFIGS."""
        if name not in GEOCHAT_CONFIGS:
            raise ValueError(f"unknown GeoChat config {name!r}; known: {', '.join(GEOCHAT_CONFIGS)}")
        return cls.from_dict(GEOCHAT_CONFIGS[name])

    @classmethod
    def from_dict(cls, d: dict) -> "GeoChatConfig":
        """The config from our own config.json dict."""
        rest = {k: v for k, v in d.items() if k not in ("vision", "llm", "format")}
        return cls(vision=ViTConfig(**d["vision"]), llm=LlamaConfig(**d["llm"]), **rest)

    def to_dict(self) -> dict:
        """Our own config.json dict."""
        return {
            "format": NATIVE_FORMAT,
            "vision": self.vision.to_dict(),
            "llm": self.llm.to_dict(),
            "image_size": self.image_size,
            "select_layer": self.select_layer,
            "projector": self.projector,
        } | ({"quantization": self.quantization} if self.quantization is not None else {})


GEOCHAT_CONFIGS = {
    "geochat-7b": {"vision": ViTConfig.from_name("ViT-L/14-336").to_dict(), "llm": LlamaConfig.from_name("vicuna-7b").to_dict()},
    "llava-1.5-7b": {
        "vision": ViTConfig.from_name("ViT-L/14-336").to_dict(),
        "llm": LlamaConfig.from_name("vicuna-7b").to_dict(),
        "image_size": 336,
    },
    # Baby GeoChat: a few million parameters, trained from scratch on CPU on synthetic aerial scenes.
    "baby": {
        "vision": ViTConfig(image_size=128, patch_size=16, width=192, n_layers=4, n_heads=3, mlp_dim=768).to_dict(),
        "llm": LlamaConfig(vocab_size=1000, dim=256, n_layers=4, n_heads=4, intermediate_size=688, max_seq_len=512).to_dict(),
        "image_size": 128,
    },
}


class Projector(nn.Module):
    """mlp2x_gelu: Linear -> exact GELU -> Linear, vision width to decoder width."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def attention_inputs(attention_mask: torch.Tensor):
    """Rotary positions (B, T) and a causal + padding mask (B, 1, T, T) from a (B, T) padding mask."""
    attention_mask = attention_mask.bool()
    T = attention_mask.shape[1]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    mask = causal & attention_mask[:, None, None, :]  # (B, 1, T, T)
    mask = mask | torch.eye(T, dtype=torch.bool, device=attention_mask.device)  # pad rows see themselves: no NaN
    return positions, mask


class GeoChat(nn.Module):
    def __init__(self, cfg: GeoChatConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision, cfg.image_size, cfg.select_layer)
        self.projector = Projector(cfg.vision.width, cfg.llm.dim)
        self.llm = Llama(cfg.llm)

    @property
    def n_image_tokens(self) -> int:
        return self.vision.n_patches

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Projected patch features (N, n_patches, dim) of preprocessed images (N, 3, S, S)."""
        feats = self.vision(images)  # (N, n_patches, vision width)
        return self.projector(feats.to(self.projector.fc1.weight.dtype))  # (N, n_patches, dim)

    def embed_inputs(self, input_ids, images=None, attention_mask=None, labels=None, padding_side="right"):
        """Splice image features into the token embeddings at each IMAGE_TOKEN_ID.

        input_ids (B, T) with placeholders; images (N, 3, S, S), one per placeholder, in order.
        Returns embeds (B, L, dim), attention_mask (B, L) bool, labels (B, L) or None, where each
        placeholder became n_patches positions (labelled IGNORE_INDEX); rows of different spliced
        length are padded on `padding_side`.
        """
        is_image = input_ids == IMAGE_TOKEN_ID
        n_placeholders, n_images = int(is_image.sum()), 0 if images is None else images.shape[0]
        if n_placeholders != n_images:
            raise ValueError(f"the prompts hold {n_placeholders} image placeholders but {n_images} images were given")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        text = self.llm.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, dim)
        if n_images == 0:
            return text, attention_mask, labels
        feats = self.encode_images(images).to(text.dtype)  # (N, P, dim)
        P = feats.shape[1]
        rows, masks, labs, image_index = [], [], [], 0
        for b in range(input_ids.shape[0]):
            cuts = is_image[b].nonzero().flatten().tolist()
            start, pieces, mask_pieces, label_pieces = 0, [], [], []
            for cut in cuts + [input_ids.shape[1]]:
                pieces.append(text[b, start:cut])
                mask_pieces.append(attention_mask[b, start:cut])
                if labels is not None:
                    label_pieces.append(labels[b, start:cut])
                if cut < input_ids.shape[1]:
                    pieces.append(feats[image_index])
                    mask_pieces.append(attention_mask[b, cut].expand(P))
                    if labels is not None:
                        label_pieces.append(labels.new_full((P,), IGNORE_INDEX))
                    image_index += 1
                start = cut + 1
            rows.append(torch.cat(pieces))
            masks.append(torch.cat(mask_pieces))
            labs.append(torch.cat(label_pieces) if labels is not None else None)
        L = max(r.shape[0] for r in rows)

        def pad(x, value):
            gap = L - x.shape[0]
            if gap == 0:
                return x
            filler = x.new_full((gap, *x.shape[1:]), value)
            return torch.cat([filler, x] if padding_side == "left" else [x, filler])

        embeds = torch.stack([pad(r, 0) for r in rows])  # (B, L, dim)
        attention_mask = torch.stack([pad(m, False) for m in masks])  # (B, L)
        labels = torch.stack([pad(lab, IGNORE_INDEX) for lab in labs]) if labels is not None else None
        return embeds, attention_mask, labels

    def forward(self, input_ids, images=None, attention_mask=None):
        """Logits (B, T - n_placeholders + n_placeholders * n_patches, vocab) for prompts with images spliced in."""
        embeds, attention_mask, _ = self.embed_inputs(input_ids, images, attention_mask)
        return self.forward_embeds(embeds, attention_mask)

    def forward_embeds(self, embeds, attention_mask=None):
        """Decoder logits (B, L, vocab) of spliced embeddings, with an optional (B, L) padding mask."""
        if attention_mask is None or bool(attention_mask.all()):
            return self.llm(embeds)  # causal fast path (flash kernels on GPU)
        positions, mask = attention_inputs(attention_mask)
        return self.llm(embeds, positions, mask)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.bfloat16, device="cpu", vision_tower=None) -> "GeoChat":
        """Load any supported checkpoint directory (see module docstring) in `dtype` on `device`."""
        return load_checkpoint(Path(path), dtype, device, vision_tower)

    def save_pretrained(self, out_dir, tokenizer_model=None):
        """Write our own layout: config.json, model.safetensors (one file) and tokenizer.model."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": NATIVE_FORMAT})
        (out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        if tokenizer_model is not None:
            (out / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())


# ---------------------------------------------------------------------------------------------
# Key maps: one table per checkpoint layout, stored name template -> our name template. "{}" is a
# layer index. A stored key mapped to None is known and deliberately unused.

LLAMA_BODY = [
    ("embed_tokens.weight", "llm.embed_tokens.weight"),
    ("layers.{}.self_attn.q_proj.weight", "llm.layers.{}.attn.q_proj.weight"),
    ("layers.{}.self_attn.k_proj.weight", "llm.layers.{}.attn.k_proj.weight"),
    ("layers.{}.self_attn.v_proj.weight", "llm.layers.{}.attn.v_proj.weight"),
    ("layers.{}.self_attn.o_proj.weight", "llm.layers.{}.attn.o_proj.weight"),
    ("layers.{}.mlp.gate_proj.weight", "llm.layers.{}.mlp.gate_proj.weight"),
    ("layers.{}.mlp.up_proj.weight", "llm.layers.{}.mlp.up_proj.weight"),
    ("layers.{}.mlp.down_proj.weight", "llm.layers.{}.mlp.down_proj.weight"),
    ("layers.{}.input_layernorm.weight", "llm.layers.{}.attn_norm.weight"),
    ("layers.{}.post_attention_layernorm.weight", "llm.layers.{}.mlp_norm.weight"),
    ("norm.weight", "llm.norm.weight"),
    ("layers.{}.self_attn.rotary_emb.inv_freq", None),
    ("rotary_emb.inv_freq", None),
]

CLIP_VISION_BODY = [
    ("embeddings.class_embedding", "vision.class_embed"),
    ("embeddings.patch_embedding.weight", "vision.patch_embed.weight"),
    ("embeddings.position_embedding.weight", "vision.pos_embed"),
    ("embeddings.position_ids", None),
    ("pre_layrnorm.{}", "vision.pre_norm.{}"),
    ("encoder.layers.{}.self_attn.q_proj.{}", "vision.blocks.{}.attn.q_proj.{}"),
    ("encoder.layers.{}.self_attn.k_proj.{}", "vision.blocks.{}.attn.k_proj.{}"),
    ("encoder.layers.{}.self_attn.v_proj.{}", "vision.blocks.{}.attn.v_proj.{}"),
    ("encoder.layers.{}.self_attn.out_proj.{}", "vision.blocks.{}.attn.o_proj.{}"),
    ("encoder.layers.{}.layer_norm1.{}", "vision.blocks.{}.norm1.{}"),
    ("encoder.layers.{}.layer_norm2.{}", "vision.blocks.{}.norm2.{}"),
    ("encoder.layers.{}.mlp.fc1.{}", "vision.blocks.{}.mlp.fc1.{}"),
    ("encoder.layers.{}.mlp.fc2.{}", "vision.blocks.{}.mlp.fc2.{}"),
    ("post_layernorm.{}", None),  # GeoChat's features skip the final LayerNorm
]


def prefixed(prefix: str, table):
    """The table with `prefix` put before every stored name."""
    return [(prefix + stored, ours) for stored, ours in table]


# The GeoChat / LLaVA-1.5 release (a LoRA-merged LLaVA checkpoint).
LLAVA_RELEASE_KEYS = (
    prefixed("model.", LLAMA_BODY)
    + [("lm_head.weight", "llm.lm_head.weight")]
    + [("model.mm_projector.0.{}", "projector.fc1.{}"), ("model.mm_projector.2.{}", "projector.fc2.{}")]
    + prefixed("model.vision_tower.vision_tower.vision_model.", CLIP_VISION_BODY)
)

# A CLIP checkpoint: CLIPVisionModel or a full CLIPModel (its text side ignored); transformers 5 saves bare names.
CLIP_KEYS = prefixed("vision_model.", CLIP_VISION_BODY) + CLIP_VISION_BODY + [
    ("text_model.{}", None),
    ("text_projection.weight", None),
    ("visual_projection.weight", None),
    ("logit_scale", None),
]

# HF llava-hf: transformers 4.x names, transformers 5.x names, and 5.x's saved (reverse-mapped) names.
LLAVA_HF_KEYS = (
    prefixed("language_model.model.", LLAMA_BODY)
    + [("language_model.lm_head.weight", "llm.lm_head.weight")]
    + prefixed("model.language_model.", LLAMA_BODY)
    + [("lm_head.weight", "llm.lm_head.weight")]
    + [("multi_modal_projector.linear_1.{}", "projector.fc1.{}"), ("multi_modal_projector.linear_2.{}", "projector.fc2.{}")]
    + [("model.multi_modal_projector.linear_1.{}", "projector.fc1.{}"), ("model.multi_modal_projector.linear_2.{}", "projector.fc2.{}")]
    + prefixed("vision_tower.vision_model.", CLIP_VISION_BODY)
    + prefixed("vision_tower.", CLIP_VISION_BODY)
    + prefixed("model.vision_tower.vision_model.", CLIP_VISION_BODY)
    + prefixed("model.vision_tower.", CLIP_VISION_BODY)
)


def compile_key_map(table):
    """Regexes for a key table: [(compiled stored pattern, our template)]."""
    return [(re.compile("^" + re.escape(stored).replace(r"\{\}", r"([A-Za-z0-9_]+)") + "$"), ours) for stored, ours in table]


def map_keys(stored_keys, table, source: str) -> dict:
    """Map stored key -> our key (None when deliberately unused); raise naming every unknown key."""
    patterns, mapping, unexpected = compile_key_map(table), {}, []
    for key in stored_keys:
        for pattern, ours in patterns:
            m = pattern.match(key)
            if m:
                mapping[key] = None if ours is None else ours.format(*m.groups())
                break
        else:
            unexpected.append(key)
    if unexpected:
        raise ValueError(f"{source}: unexpected keys for this layout: {', '.join(sorted(unexpected)[:10])}"
                         + (f" (and {len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    return mapping


def unmap_keys(our_keys, table) -> dict:
    """The inverse of map_keys: our key -> stored key under the first template of `table` that fits."""
    patterns = [(re.compile("^" + re.escape(ours).replace(r"\{\}", r"([A-Za-z0-9_]+)") + "$"), stored)
                for stored, ours in table if ours is not None]
    out = {}
    for key in our_keys:
        stored = next((s.format(*m.groups()) for p, s in patterns if (m := p.match(key))), None)
        if stored is None:
            raise ValueError(f"{key} has no stored name in this layout")
        out[key] = stored
    return out


# ---------------------------------------------------------------------------------------------
# Reading weight files lazily.

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")


def find_weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint directory (from its index json when sharded)."""
    for name in WEIGHT_FILES:
        candidate = directory / name
        if not candidate.exists():
            continue
        if not name.endswith(".index.json"):
            return [candidate]
        try:
            weight_map = json.loads(candidate.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{candidate}: not a valid weight index ({e})") from None
        shards = [directory / s for s in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.exists()]
        if missing:
            raise FileNotFoundError(f"{candidate} lists shards that are missing: {', '.join(missing)}")
        return shards
    raise FileNotFoundError(f"{directory}: no weights found (looked for {', '.join(WEIGHT_FILES)})")


class WeightFile:
    """One .safetensors or .bin file whose tensors are memory-mapped, not read, until used."""

    def __init__(self, path: Path):
        self.path = path
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self._handle = safe_open(str(path), framework="pt", device="cpu")
                self.keys = list(self._handle.keys())
            else:
                self._handle = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                self.keys = list(self._handle.keys())
        except Exception as e:  # any parse failure of a user's file: say which file
            raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None

    def get(self, key: str) -> torch.Tensor:
        """The (memory-mapped) tensor stored under key."""
        if isinstance(self._handle, dict):
            return self._handle[key]
        return self._handle.get_tensor(key)


_libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
MADV_DONTNEED = 4


def release_pages(t: torch.Tensor):
    """Tell the kernel we are done with the mmap'd pages under t (Linux), so they leave resident memory."""
    if _libc is None or t.numel() == 0:
        return
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


def read_json(path: Path) -> dict:
    """A json file's object, with an error that names the file."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# Configs of each layout.


def detect_layout(hf: dict) -> str:
    """'native', 'llava-hf' or 'llava-release', from config.json's fields (never the folder name)."""
    if hf.get("format") == NATIVE_FORMAT:
        return "native"
    if "text_config" in hf and "vision_config" in hf:
        return "llava-hf"
    if "mm_vision_tower" in hf or "mm_projector_type" in hf:
        return "llava-release"
    raise ValueError("config.json is neither ours, llava-hf nor a GeoChat/LLaVA release (no mm_vision_tower)")


def vision_tower_dir(hf: dict, explicit) -> Path | None:
    """The separate CLIP directory: given explicitly, or mm_vision_tower when it is a local path."""
    if explicit is not None:
        d = Path(explicit)
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"vision tower directory {d} has no config.json")
        return d
    named = hf.get("mm_vision_tower")
    if named and (Path(named) / "config.json").exists():
        return Path(named)
    return None


def release_config(hf: dict, clip_dir: Path | None) -> GeoChatConfig:
    """GeoChatConfig of a GeoChat / LLaVA-1.5 release config.json."""
    if clip_dir is not None:
        vision = ViTConfig.from_hf(read_json(clip_dir / "config.json"))
    elif hf.get("mm_vision_tower") in HUB_VISION_TOWERS:
        vision = ViTConfig.from_name(HUB_VISION_TOWERS[hf["mm_vision_tower"]])
    else:
        raise ValueError(f"unknown vision tower {hf.get('mm_vision_tower')!r}: pass vision_tower=<CLIP directory>")
    if hf.get("mm_vision_select_feature", "patch") != "patch":
        raise ValueError(f"mm_vision_select_feature {hf['mm_vision_select_feature']!r} is not supported (only 'patch')")
    default_size = 504 if hf.get("model_type") == "geochat" else vision.image_size
    return GeoChatConfig(
        vision=vision,
        llm=LlamaConfig.from_hf(hf),
        image_size=hf.get("mm_image_size") or default_size,
        select_layer=hf.get("mm_vision_select_layer", -2),
        projector=hf.get("mm_projector_type", "linear"),
    )


def llava_hf_config(hf: dict) -> GeoChatConfig:
    """GeoChatConfig of an HF llava-hf config.json."""
    if hf.get("vision_feature_select_strategy", "default") != "default":
        raise ValueError(f"vision_feature_select_strategy {hf['vision_feature_select_strategy']!r} is not supported")
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"unknown projector type (activation {hf['projector_hidden_act']!r})")
    vision = ViTConfig.from_hf(hf["vision_config"])
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r} is not supported (only one layer)")
    return GeoChatConfig(
        vision=vision, llm=LlamaConfig.from_hf(hf["text_config"]), image_size=hf.get("mm_image_size") or vision.image_size,
        select_layer=layer, projector="mlp2x_gelu",
    )


# ---------------------------------------------------------------------------------------------
# Loading.


def collect_sources(files: list[Path], table, source: str) -> dict:
    """Our key -> (WeightFile, stored key) over all files of one checkpoint."""
    sources = {}
    for path in files:
        wf = WeightFile(path)
        for stored, ours in map_keys(wf.keys, table, str(path)).items():
            if ours is None:
                continue
            if ours in sources:
                raise ValueError(f"{source}: {stored} and {sources[ours][1]} both map to {ours}")
            sources[ours] = (wf, stored)
    return sources


def read_state(sources: dict, model: GeoChat, expected: dict, dtype, device, keep_dtype=frozenset()):
    """Read every expected tensor from `sources` (our key -> (WeightFile, stored key)) in `dtype` on `device`
    (keys in keep_dtype keep their stored dtype): (state, problems naming each unexpected, mis-shaped or missing key)."""
    state, problems, misshaped = {}, [], set()
    cfg = model.cfg
    built_blocks = len(model.vision.blocks)
    for ours, (wf, stored) in sources.items():
        if ours not in expected:
            m = re.match(r"vision\.blocks\.(\d+)\.", ours)
            if m and built_blocks <= int(m.group(1)) < cfg.vision.n_layers:
                continue  # blocks after the selected feature layer are never run
            problems.append(f"unexpected {stored} (as {ours}) in {wf.path.name}")
            continue
        tensor = wf.get(stored)
        if ours == "vision.pos_embed" and tensor.ndim == 2 and tensor.shape[0] != expected[ours].shape[0]:
            tensor = interpolate_pos_embed(tensor, model.vision.grid)
        if tensor.shape != expected[ours].shape:
            problems.append(f"{stored} in {wf.path.name} has shape {tuple(tensor.shape)}, expected {tuple(expected[ours].shape)}")
            misshaped.add(ours)
            continue
        want = expected[ours].dtype
        if not want.is_floating_point and tensor.dtype != want:  # never cast floats into quantised integers
            problems.append(f"{stored} in {wf.path.name} has dtype {str(tensor.dtype)[6:]}, expected {str(want)[6:]}")
            misshaped.add(ours)
            continue
        # quantised weights and their float32 scales keep their dtype; everything else is asked for in dtype
        loaded = tensor.to(device=device, dtype=want if ours in keep_dtype else dtype)
        if loaded.data_ptr() != tensor.data_ptr():
            release_pages(tensor)
        state[ours] = loaded
    missing = sorted(set(expected) - set(state) - misshaped)
    if missing:
        hint = " (no vision tower weights: pass vision_tower=<CLIP directory>)" if any(k.startswith("vision.") for k in missing) else ""
        problems.append(f"missing {', '.join(missing[:10])}" + (f" and {len(missing) - 10} more" if len(missing) > 10 else "") + hint)
    return state, problems


def load_vision_tower(model: GeoChat, clip_dir) -> GeoChat:
    """Overwrite model's vision tower with a CLIP directory's (config.json + weights), in place; raise on any mismatch."""
    clip_dir = Path(clip_dir)
    if not (clip_dir / "config.json").is_file():
        raise FileNotFoundError(f"vision tower directory {clip_dir} has no config.json")
    stored = ViTConfig.from_hf(read_json(clip_dir / "config.json"))
    if stored != model.cfg.vision:
        raise ValueError(f"{clip_dir}: the tower's config {stored} differs from the model's {model.cfg.vision}")
    expected = {k: v for k, v in model.state_dict().items() if k.startswith("vision.")}
    sources = collect_sources(find_weight_files(clip_dir), CLIP_KEYS, str(clip_dir))
    state, problems = read_state(sources, model, expected, model.vision.patch_embed.weight.dtype,
                                 model.vision.patch_embed.weight.device)
    if problems:
        raise ValueError(f"{clip_dir}: cannot load the vision tower: " + "; ".join(problems))
    with torch.no_grad():
        for key, tensor in state.items():
            model.get_parameter(key).copy_(tensor)
    return model


def load_checkpoint(path: Path, dtype, device, vision_tower=None) -> GeoChat:
    """Build GeoChat on the meta device and assign every weight from the checkpoint directory."""
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} not found")
    hf = read_json(path / "config.json")
    layout = detect_layout(hf)
    clip_dir = vision_tower_dir(hf, vision_tower) if layout == "llava-release" else None
    if layout == "native":
        cfg, table = GeoChatConfig.from_dict(hf), None
    elif layout == "llava-hf":
        cfg, table = llava_hf_config(hf), LLAVA_HF_KEYS
    else:
        cfg, table = release_config(hf, clip_dir), LLAVA_RELEASE_KEYS
    quantization = None
    if cfg.quantization is not None:  # ours only: QuantLinears to load the int8 / int4 weights into
        quantization = quant.check_quantization(cfg.quantization, str(path / "config.json"))
    with torch.device("meta"):
        model = GeoChat(cfg)
    if quantization is not None:
        quant.quantize_model(model, quantization["mode"], quantization["group_size"])
    expected = model.state_dict()
    quantized_keys = {f"{name}.{buffer}" for name in quant.quantizable_linears(model) for buffer in ("weight", "weight_scale")
                      } if quantization is not None else set()
    if table is None:  # our own names, mapped one to one
        table = [(k, k) for k in expected]
    sources = collect_sources(find_weight_files(path), table, str(path))
    if clip_dir is not None and not any(k.startswith("vision.") for k in sources):
        sources.update(collect_sources(find_weight_files(clip_dir), CLIP_KEYS, str(clip_dir)))
    state, problems = read_state(sources, model, expected, dtype, device, quantized_keys)
    if problems:
        raise ValueError(f"{path}: cannot load checkpoint: " + "; ".join(problems))
    model.load_state_dict(state, assign=True, strict=True)
    if quantization is not None:
        quant.prepare_kernels(model)
    return model.eval()
