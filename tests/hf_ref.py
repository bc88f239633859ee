"""Tiny random HF reference models, written to disk in every checkpoint layout we load (tests only)."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

def tiny_llava(seed=0, gqa=False, image_size=56, patch_size=14, vision_layers=3, vocab_size=256, dim=64, n_layers=2):
    """A random LlavaForConditionalGeneration (fp32, eval) with tiny CLIP and Llama configs."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=16, hidden_act="quick_gelu", initializer_factor=5.0,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim + 8, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=512,
        initializer_range=0.1, rms_norm_eps=1e-5,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=vocab_size - 1,  # the last id: never produced by the test tokenizers
        projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return model


def geochat_interpolate_reference(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """GeoChat's procedure written directly: class row kept, (1, C, g, g) grid resized bicubic, align_corners=True."""
    cls_row, patches = pos[:1], pos[1:]
    g = int(round(patches.shape[0] ** 0.5))
    patches = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=True)
    return torch.cat([cls_row, patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def hf_parts(model):
    """(vision state dict under `vision_model.`, projector dict, llama-body dict, lm_head) of a llava-hf model."""
    sd = model.state_dict()
    vision = {"vision_model." + k[len("model.vision_tower."):].removeprefix("vision_model."): v
              for k, v in sd.items() if k.startswith("model.vision_tower.")}
    projector = {k[len("model.multi_modal_projector."):]: v for k, v in sd.items() if k.startswith("model.multi_modal_projector.")}
    body = {k[len("model.language_model."):]: v for k, v in sd.items() if k.startswith("model.language_model.")}
    return vision, projector, body, sd["lm_head.weight"]


def save_clip_dir(model, out: Path, image_size=None, pos_embed=None, with_weights=True):
    """The vision tower as its own HF CLIPVisionModel directory (optionally at another image size)."""
    out.mkdir(parents=True, exist_ok=True)
    vcfg = model.config.vision_config.to_dict()
    if image_size is not None:
        vcfg["image_size"] = image_size
    vcfg["model_type"] = "clip_vision_model"
    (out / "config.json").write_text(json.dumps(vcfg))
    if with_weights:
        vision, *_ = hf_parts(model)
        if pos_embed is not None:
            vision["vision_model.embeddings.position_embedding.weight"] = pos_embed
        save_file({k: v.contiguous() for k, v in vision.items()}, str(out / "model.safetensors"))
    return out


def release_state(model, embed_vision=True, pos_embed=None):
    """The model's weights under GeoChat release names."""
    vision, projector, body, lm_head = hf_parts(model)
    state = {"model." + k: v for k, v in body.items()}
    state["lm_head.weight"] = lm_head
    state.update({"model.mm_projector." + k.replace("linear_1", "0").replace("linear_2", "2"): v for k, v in projector.items()})
    if embed_vision:
        if pos_embed is not None:
            vision["vision_model.embeddings.position_embedding.weight"] = pos_embed
        state.update({"model.vision_tower.vision_tower." + k: v for k, v in vision.items()})
    return state


def release_config(model, mm_vision_tower, image_size, model_type="geochat"):
    """A GeoChat release config.json dict."""
    t = model.config.text_config
    return {
        "model_type": model_type, "architectures": ["GeoChatLlamaForCausalLM"], "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
        "rms_norm_eps": t.rms_norm_eps, "rope_theta": 10000.0, "vocab_size": t.vocab_size,
        "max_position_embeddings": t.max_position_embeddings, "mm_vision_tower": str(mm_vision_tower),
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_image_size": image_size,
    }


def write_sharded(state: dict, out: Path, fmt: str, n_shards=2):
    """Write state as n shards plus the HF index json (.bin via torch.save or .safetensors)."""
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    ext, index_name = (".bin", "pytorch_model.bin.index.json") if fmt == "bin" else (".safetensors", "model.safetensors.index.json")
    stem = "pytorch_model" if fmt == "bin" else "model"
    weight_map = {}
    for i in range(n_shards):
        name = f"{stem}-{i + 1:05d}-of-{n_shards:05d}{ext}"
        part = {k: state[k].contiguous() for k in keys[i::n_shards]}
        if fmt == "bin":
            torch.save(part, out / name)
        else:
            save_file(part, str(out / name))
        weight_map.update({k: name for k in part})
    (out / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_release(model, out: Path, fmt="safetensors", clip_dir=None, embed_vision=True, pos_embed=None, image_size=None):
    """A GeoChat-release directory of `model` (config.json + shards + index)."""
    image_size = image_size or model.config.vision_config.image_size
    write_sharded(release_state(model, embed_vision, pos_embed), out, fmt)
    (out / "config.json").write_text(json.dumps(release_config(model, clip_dir or "openai/clip-vit-large-patch14-336", image_size)))
    return out


def hf_inputs(model, ids_with_placeholder: torch.Tensor, attention_mask=None):
    """HF input_ids and attention_mask for our (B, T) ids holding -200 once per row (expanded to n_patches image tokens)."""
    n_patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    rows, masks = [], []
    for b in range(ids_with_placeholder.shape[0]):
        ids = ids_with_placeholder[b].tolist()
        m = [1] * len(ids) if attention_mask is None else attention_mask[b].long().tolist()
        i = ids.index(-200)
        rows.append(ids[:i] + [model.config.image_token_index] * n_patches + ids[i + 1:])
        masks.append(m[:i] + [m[i]] * n_patches + m[i + 1:])
    return torch.tensor(rows), torch.tensor(masks)


def hf_logits(model, ids_with_placeholder: torch.Tensor, images: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """HF logits for our (B, T) ids holding -200 once per row."""
    input_ids, mask = hf_inputs(model, ids_with_placeholder, attention_mask)
    with torch.no_grad():
        return model(input_ids=input_ids.to(images.device), pixel_values=images, attention_mask=mask.to(images.device)).logits
