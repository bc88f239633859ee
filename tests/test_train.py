"""Tests for train.py on a tiny GeoChat: 1 vs 2 processes (FSDP2), resume, kill mid-save, overfit, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import lora  # noqa: E402
import train  # noqa: E402
from data import IGNORE_INDEX, InstructDataset, Tokenizer, collate  # noqa: E402
from geochat import GeoChat, GeoChatConfig  # noqa: E402
from llama import LlamaConfig  # noqa: E402
from vit import ViTConfig  # noqa: E402

torch.set_num_threads(2)

ANSWERS = [
    "There are two planes parked at the airport.", "Yes", "No", "urban", "3",
    "<p>two planes</p> {<8><82><16><90>|<69>}", "{<12><34><56><78>|<45>}",
    "The image shows a large parking lot with 25 cars.", "a tennis court", "dense residential",
]
QUESTIONS = [
    "[grounding] Describe the image in detail.", "Is there a building near the road?",
    "[refer] Give me the location of <p> the small white car </p>", "Is it a rural or an urban area?",
    "How many ships are in the harbor?", "What is in the image?",
]


def tiny_config(vocab_size=512) -> GeoChatConfig:
    vision = ViTConfig(image_size=28, patch_size=14, width=32, n_layers=2, n_heads=2, mlp_dim=64)
    llm = LlamaConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, intermediate_size=128, max_seq_len=512)
    return GeoChatConfig(vision=vision, llm=llm, image_size=28)


def write_dataset(folder: Path, n=24, seed=0, extras=True) -> Path:
    """n image records (PNGs of assorted sizes) plus, with extras, a text-only record and a missing image."""
    rng = np.random.default_rng(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        h, w = int(rng.integers(16, 40)), int(rng.integers(16, 40))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"P{i:04d}.png")
        turns = [{"from": "human", "value": "<image>\n" + QUESTIONS[i % len(QUESTIONS)]},
                 {"from": "gpt", "value": ANSWERS[i % len(ANSWERS)]}]
        if i % 3 == 0:
            turns += [{"from": "human", "value": QUESTIONS[(i + 1) % len(QUESTIONS)]},
                      {"from": "gpt", "value": ANSWERS[(i + 3) % len(ANSWERS)]}]
        records.append({"id": f"P{i:04d}", "image": f" P{i:04d}.png ", "conversations": turns})
    if extras:
        records[5] = {"id": "text", "conversations": [{"from": "human", "value": "Is it a rural or an urban area?"},
                                                      {"from": "gpt", "value": "urban"}]}
        records[9]["image"] = "missing.png"
    path = folder / "instruct.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory, sp_model_path):
    """A tiny native checkpoint (with tokenizer.model) and a synthetic dataset."""
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    model = GeoChat(tiny_config())
    with torch.no_grad():  # non-trivial vision embeddings, so that images matter
        model.vision.pos_embed.normal_(0, 0.5)
        model.vision.class_embed.normal_(0, 0.5)
    model.save_pretrained(root / "ckpt", tokenizer_model=sp_model_path)
    (root / "tiny_config.json").write_text(json.dumps(tiny_config().to_dict()))
    data = write_dataset(root)
    return {"root": root, "ckpt": root / "ckpt", "data": data, "images": data.parent / "images",
            "tokenizer": sp_model_path, "config": root / "tiny_config.json"}


def base_args(s, out, *extra):
    return ["--checkpoint", str(s["ckpt"]), "--data", str(s["data"]), "--image-folder", str(s["images"]),
            "--out", str(out), "--device", "cpu", "--dtype", "float32", "--seed", "1", *map(str, extra)]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [m["loss"] for m in metrics(out)]


def run_main(args):
    return train.main(args)


# ---------------------------------------------------------------------------------------------


def test_one_vs_two_processes(setup_dir, tmp_path):
    """Same global batches, same losses and weights on 1 process and on 2 (torchrun, gloo, FSDP2)."""
    common = ["--mode", "lora", "--max-steps", 3, "--global-batch", 8, "--batch-size", 2, "--lr", 1e-2,
              "--lora-r", 4, "--lora-alpha", 8, "--lora-dropout", 0, "--warmup-ratio", 0.3]
    one = tmp_path / "one"
    run_main(base_args(setup_dir, one, *common))
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
           str(REPO / "train.py"), *base_args(setup_dir, two, *common)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m1, m2 = metrics(one), metrics(two)
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
        assert (a["tokens"], a["skipped"], a["lr"]) == (b["tokens"], b["skipped"], b["lr"])
    assert m1[-1]["skipped"] >= 1  # the record with a missing image
    w1, w2 = load_file(str(one / "adapter.safetensors")), load_file(str(two / "adapter.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)
