"""Our GeoChat against HF transformers, loaded from every checkpoint layout (fp32, tiny random models)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hf_ref
from geochat import CLIP_KEYS, LLAVA_HF_KEYS, GeoChat, GeoChatConfig, map_keys
from llama import LlamaConfig
from vit import ViTConfig, VisionTower, interpolate_pos_embed

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def prompt_ids(batch=2, length=12, vocab=240, seed=0):
    """(B, T) random ids with one -200 placeholder per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    ids[:, 3] = -200
    return ids


def images_for(model, batch=2, seed=1):
    size = model.config.vision_config.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_close_to_hf(ours: GeoChat, ref, ids=None, attention_mask=None):
    ids = prompt_ids() if ids is None else ids
    images = images_for(ref, ids.shape[0])
    with torch.no_grad():
        got = ours(ids, images, attention_mask)
    want = hf_ref.hf_logits(ref, ids, images, attention_mask)
    assert got.shape == want.shape
    valid = torch.ones(want.shape[:2], dtype=torch.bool) if attention_mask is None else ours.embed_inputs(ids, images, attention_mask)[1]
    diff = (got - want)[valid].abs().max().item()
    print(f"max |logit difference| = {diff:.2e} (logit std {want.std().item():.2f})")
    assert want.std() > 0.1 and diff < TOL
    return diff


@pytest.fixture(scope="module")
def ref():
    return hf_ref.tiny_llava(seed=0)


@pytest.fixture(scope="module")
def ref_gqa():
    return hf_ref.tiny_llava(seed=1, gqa=True)


def test_release_bin_shards_embedded_tower_with_stored_grid(tmp_path):
    # The checkpoint stores a 3x3 position grid (like 577 rows at 336 px); the model runs at 4x4 (like 504 px).
    ref = hf_ref.tiny_llava(seed=2, image_size=56)
    small = torch.randn(1 + 9, 48)
    with torch.no_grad():
        ref.model.vision_tower.embeddings.position_embedding.weight.copy_(hf_ref.geochat_interpolate_reference(small, 4))
    clip_dir = hf_ref.save_clip_dir(ref, tmp_path / "clip", image_size=42, with_weights=False)
    ckpt = hf_ref.write_release(ref, tmp_path / "geochat", fmt="bin", clip_dir=clip_dir, pos_embed=small, image_size=56)
    model = GeoChat.from_pretrained(ckpt, dtype=torch.float32)
    assert model.vision.pos_embed.shape == (17, 48) and model.n_image_tokens == 16
    assert_close_to_hf(model, ref)


def test_release_safetensors_shards_separate_clip_dir(tmp_path, ref):
    clip_dir = hf_ref.save_clip_dir(ref, tmp_path / "clip")
    ckpt = hf_ref.write_release(ref, tmp_path / "geochat", fmt="safetensors", embed_vision=False)
    model = GeoChat.from_pretrained(ckpt, dtype=torch.float32, vision_tower=clip_dir)
    assert_close_to_hf(model, ref)
    with pytest.raises(ValueError, match="vision tower"):
        GeoChat.from_pretrained(ckpt, dtype=torch.float32)  # neither embedded weights nor a CLIP directory


def test_release_with_gqa_and_full_position_rows(tmp_path, ref_gqa):
    clip_dir = hf_ref.save_clip_dir(ref_gqa, tmp_path / "clip", with_weights=False)
    ckpt = hf_ref.write_release(ref_gqa, tmp_path / "geochat", fmt="safetensors", clip_dir=clip_dir)
    model = GeoChat.from_pretrained(ckpt, dtype=torch.float32)
    assert model.cfg.llm.n_kv_heads == 2
    assert_close_to_hf(model, ref_gqa)


def test_padded_batch_matches_hf(tmp_path, ref):
    clip_dir = hf_ref.save_clip_dir(ref, tmp_path / "clip", with_weights=False)
    model = GeoChat.from_pretrained(hf_ref.write_release(ref, tmp_path / "g", clip_dir=clip_dir), dtype=torch.float32)
    ids = prompt_ids()
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :2] = False  # left padding in row 0
    assert_close_to_hf(model, ref, ids, mask)


@pytest.mark.parametrize("naming", ["transformers5-saved", "transformers4", "transformers5-memory"])
def test_llava_hf_layouts(tmp_path, ref, naming):
    out = tmp_path / "llava-hf"
    ref.save_pretrained(out)
    if naming != "transformers5-saved":
        vision, projector, body, lm_head = hf_ref.hf_parts(ref)
        if naming == "transformers4":
            state = {"vision_tower." + k: v for k, v in vision.items()}
            state.update({"multi_modal_projector." + k: v for k, v in projector.items()})
            state.update({"language_model.model." + k: v for k, v in body.items()})
            state["language_model.lm_head.weight"] = lm_head
        else:
            state = {k: v for k, v in ref.state_dict().items()}
        (out / "model.safetensors").unlink()
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    model = GeoChat.from_pretrained(out, dtype=torch.float32)
    assert model.cfg.image_size == ref.config.vision_config.image_size  # llava-hf keeps the tower's own size
    assert_close_to_hf(model, ref)


def test_converter_writes_native_checkpoint(tmp_path, ref):
    clip_dir = hf_ref.save_clip_dir(ref, tmp_path / "clip", with_weights=False)
    ckpt = hf_ref.write_release(ref, tmp_path / "geochat", fmt="bin", clip_dir=clip_dir)
    (ckpt / "tokenizer.model").write_bytes(b"sentencepiece stand-in")
    out = tmp_path / "native"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "convert.py"), str(ckpt), str(out), "--dtype", "float32"], check=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    model = GeoChat.from_pretrained(out, dtype=torch.float32)
    assert_close_to_hf(model, ref)


def test_interpolation_matches_geochat_procedure():
    pos = torch.randn(1 + 24 * 24, 32)
    ours = interpolate_pos_embed(pos, 36)
    assert ours.shape == (1297, 32)
    torch.testing.assert_close(ours, hf_ref.geochat_interpolate_reference(pos, 36), rtol=0, atol=1e-6)
    assert torch.equal(ours[0], pos[0])  # the class row is kept as is
    assert interpolate_pos_embed(ours, 36) is ours  # same grid: untouched
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.randn(11, 4), 3)


def test_image_size_rules(tmp_path, ref):
    from geochat import release_config

    hf = hf_ref.release_config(ref, "openai/clip-vit-large-patch14-336", 56)
    del hf["mm_image_size"]
    assert release_config(hf, None).image_size == 504  # model_type geochat
    assert release_config({**hf, "model_type": "llava"}, None).image_size == 336  # LLaVA-1.5: the tower's own
    assert release_config({**hf, "mm_image_size": 448}, None).image_size == 448
    with pytest.raises(ValueError, match="unknown projector type"):
        release_config({**hf, "mm_projector_type": "mlp3x_relu"}, None)


def test_full_size_geochat_7b_matches_hf_names_and_shapes():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    with torch.device("meta"):
        ours = GeoChat(GeoChatConfig.from_name("geochat-7b"))
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=504, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
        text = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
        hf = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2))
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    mapping = map_keys(hf_shapes, LLAVA_HF_KEYS, "hf")
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    mapped = {mapping[k]: s for k, s in hf_shapes.items() if mapping[k] is not None and not mapping[k].startswith("vision.blocks.23.")}
    assert mapped == ours_shapes
    assert ours_shapes["vision.pos_embed"] == (1297, 1024) and ours.n_image_tokens == 1296
    assert len(ours.vision.blocks) == 23  # the 24th block never feeds layer -2
    n_params = sum(v.numel() for v in ours.state_dict().values())
    assert 7.0e9 < n_params < 7.1e9


@pytest.mark.slow
def test_real_width_vit_l14_at_504_matches_hf():
    from transformers import CLIPVisionModel, CLIPVisionConfig

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14, hidden_act="quick_gelu")
    hf336 = CLIPVisionModel(cfg).eval()
    state = hf336.state_dict()
    mapping = map_keys(state, CLIP_KEYS, "clip")
    tower = VisionTower(ViTConfig.from_name("ViT-L/14-336"), image_size=504, select_layer=-2)
    ours_state = {}
    for k, v in state.items():
        name = mapping[k]
        if name is None or name.startswith("vision.blocks.23."):
            continue
        name = name.removeprefix("vision.")
        ours_state[name] = interpolate_pos_embed(v, 36) if name == "pos_embed" else v
    tower.load_state_dict(ours_state, strict=True)
    hf504 = CLIPVisionModel(CLIPVisionConfig(**{**cfg.to_dict(), "image_size": 504})).eval()
    hf_state = dict(state)
    pos_key = next(k for k in state if k.endswith("embeddings.position_embedding.weight"))
    hf_state[pos_key] = hf_ref.geochat_interpolate_reference(state[pos_key], 36)
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith("position_ids")}
    hf504.load_state_dict(hf_state, strict=True)
    images = torch.randn(1, 3, 504, 504)
    with torch.no_grad():
        want = hf504(images, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = tower(images)
    diff = (got - want).abs().max().item()
    print(f"ViT-L/14 @504 max |difference| = {diff:.2e}")
    assert got.shape == (1, 1296, 1024) and want.std() > 0.1 and diff < TOL


# ---------------------------------------------------------------------------------------------
# HF Llama config fields: accepted when they compute what we compute, refused otherwise.

# The Llama fields of lmsys/vicuna-7b-v1.5's config.json (transformers 4 names)
VICUNA_7B_HF = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                "hidden_act": "silu", "pretraining_tp": 1, "rope_scaling": None}


def hf_llama_dict(**fields) -> dict:
    """config.json dict of a tiny HF LlamaConfig as the installed transformers writes it."""
    from transformers import LlamaConfig as HFLlamaConfig

    return HFLlamaConfig(vocab_size=240, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, **fields).to_dict()


@pytest.mark.parametrize("fields", [
    {}, {"rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False, "head_dim": 128},
    {"rope_scaling": {"rope_type": "default"}}, {"hidden_act": "swish"},
    {"pretraining_tp": 2},  # HF 4.x splits the same matmuls into slices: the same logits
])
def test_hf_llama_config_equivalent_fields_accepted(fields):
    assert LlamaConfig.from_hf({**VICUNA_7B_HF, **fields}) == LlamaConfig.from_name("vicuna-7b")


def test_hf_llama_config_transformers5_dict_accepted():
    ours = LlamaConfig.from_hf(hf_llama_dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    assert (ours.dim, ours.n_kv_heads, ours.rope_theta) == (64, 2, 5e5)


@pytest.mark.parametrize("field, value", [
    ("rope_scaling", {"type": "linear", "factor": 2.0}), ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}),
    ("hidden_act", "gelu"), ("attention_bias", True), ("mlp_bias", True), ("head_dim", 256),
])
def test_hf_llama_config_unsupported_fields_refused(field, value):
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r} is not supported")):
        LlamaConfig.from_hf({**VICUNA_7B_HF, field: value})


def test_hf_llama_config_rope_parameters_refused():
    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 1024}
    with pytest.raises(ValueError, match=r"rope_parameters=\{'rope_type': 'llama3'.* is not supported"):
        LlamaConfig.from_hf(hf_llama_dict(rope_parameters=llama3))
    with pytest.raises(ValueError, match=r"rope_parameters=\{'rope_type': 'linear'.* is not supported"):
        LlamaConfig.from_hf(hf_llama_dict(rope_scaling={"rope_type": "linear", "factor": 2.0}))  # moved by transformers 5


# ---------------------------------------------------------------------------------------------
# Bad checkpoints.


@pytest.fixture
def release_dir(tmp_path, ref):
    clip_dir = hf_ref.save_clip_dir(ref, tmp_path / "clip", with_weights=False)
    return hf_ref.write_release(ref, tmp_path / "geochat", fmt="safetensors", clip_dir=clip_dir)


def rewrite_shard(ckpt: Path, edit):
    from safetensors.torch import load_file

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / sorted(set(index["weight_map"].values()))[0]
    state = load_file(str(shard))
    edit(state)
    save_file(state, str(shard))


def test_missing_shard_is_named(release_dir):
    (release_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        GeoChat.from_pretrained(release_dir, dtype=torch.float32)


def test_missing_key_is_named(release_dir):
    def drop(state):
        del state[next(k for k in state if "mm_projector" in k or "layers.0" in k)]
    rewrite_shard(release_dir, drop)
    with pytest.raises(ValueError, match="missing"):
        GeoChat.from_pretrained(release_dir, dtype=torch.float32)


def test_unexpected_key_is_named(release_dir):
    rewrite_shard(release_dir, lambda s: s.update({"model.some_new_adapter.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="unexpected keys.*model.some_new_adapter.weight"):
        GeoChat.from_pretrained(release_dir, dtype=torch.float32)


def test_wrong_shape_is_named(release_dir):
    def widen(state):
        k = next(k for k in state if k.endswith("weight") and state[k].ndim == 2)
        state[k] = torch.zeros(state[k].shape[0] + 1, state[k].shape[1])
    rewrite_shard(release_dir, widen)
    with pytest.raises(ValueError, match="has shape"):
        GeoChat.from_pretrained(release_dir, dtype=torch.float32)


def test_unknown_projector_type(release_dir):
    cfg = json.loads((release_dir / "config.json").read_text())
    (release_dir / "config.json").write_text(json.dumps({**cfg, "mm_projector_type": "qformer"}))
    with pytest.raises(ValueError, match="unknown projector type 'qformer'"):
        GeoChat.from_pretrained(release_dir, dtype=torch.float32)


def test_config_that_is_not_an_object_is_named(release_dir):
    (release_dir / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object, got list"):
        GeoChat.from_pretrained(release_dir, dtype=torch.float32)


def test_release_with_rope_scaling_is_refused(release_dir):
    cfg = json.loads((release_dir / "config.json").read_text())
    (release_dir / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"type": "linear", "factor": 4.0}}))
    with pytest.raises(ValueError, match="rope_scaling=.*'linear'.* is not supported"):
        GeoChat.from_pretrained(release_dir, dtype=torch.float32)


def test_corrupt_weight_file_is_named(release_dir):
    (release_dir / "model-00001-of-00002.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors: cannot read weights"):
        GeoChat.from_pretrained(release_dir, dtype=torch.float32)


def test_placeholder_image_count_mismatch(release_dir):
    model = GeoChat.from_pretrained(release_dir, dtype=torch.float32)
    ids = prompt_ids(batch=2)
    with pytest.raises(ValueError, match="2 image placeholders but 1 images"):
        model(ids, torch.zeros(1, 3, 56, 56))


def test_loading_peak_memory_stays_near_weight_size(tmp_path):
    # A small version of scripts/bench_load.py (the closing note reports it at 2+ GB).
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_load.py"), "--gigabytes", "0.5", "--dir", str(tmp_path),
                          "--formats", "safetensors"],
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    for case in result["cases"]:
        assert case["peak_over_weights"] <= 1.2, case
