"""Baby GeoChat: the shipped checkpoint answers deterministically, and train.py learns from scratch."""

import json
import subprocess
import sys
from pathlib import Path

from synthetic.prepare import train_tokenizer, write_dataset

ROOT = Path(__file__).resolve().parents[1]
BABY = ROOT / "checkpoints" / "baby-geochat"


def test_shipped_checkpoint_answers_the_shipped_examples_deterministically(tmp_path):
    """One example per task (scripts/baby_examples.py wrote them): the same answer and tokens, boxes drawn."""
    examples = json.loads((BABY / "examples" / "expected.json").read_text())
    assert {e["args"][1] for e in examples} == {"grounding", "scene", "refer", "vqa", "identify"}
    for k, want in enumerate(examples):
        out = tmp_path / f"{k}.png"
        r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--image", str(BABY / "examples" / want["image"]),
                            *want["args"], "--json", "--out", str(out), "--device", "cpu"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert got["answer"] == want["answer"] and got["token_ids"] == want["token_ids"], want
        assert want["truth"].strip()
        if want["args"][1] in ("grounding", "refer"):
            assert len(got["boxes"]) >= 1 and out.exists()


def test_twenty_steps_from_scratch_lower_the_loss(tmp_path):
    paths = write_dataset(tmp_path / "synth", n_train_images=6, n_test_images=0, seed=1, records_per_image=2)
    tokenizer, _ = train_tokenizer(paths["corpus"], tmp_path / "tokenizer.model", vocab_size=400)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", "baby", "--tokenizer", str(tokenizer),
                        "--data", str(paths["train"]), "--image-folder", str(paths["images"]), "--out", str(out),
                        "--mode", "full", "--batch-size", "4", "--global-batch", "4", "--lr", "1e-3", "--max-steps", "20",
                        "--dtype", "float32", "--max-length", "512", "--save-every", "0", "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_baby_position_embeddings_go_through_the_interpolation_path(tmp_path):
    # Like GeoChat running CLIP-336 at 504 px: the baby's 8x8 grid resized at load time for 192-px inputs.
    import torch

    from geochat import GeoChat
    from vit import interpolate_pos_embed

    bigger = tmp_path / "baby-192"
    bigger.mkdir()
    cfg = json.loads((BABY / "config.json").read_text())
    (bigger / "config.json").write_text(json.dumps({**cfg, "image_size": 192}))
    for name in ("model.safetensors", "tokenizer.model"):
        (bigger / name).symlink_to(BABY / name)
    base = GeoChat.from_pretrained(BABY, dtype=torch.float32)
    model = GeoChat.from_pretrained(bigger, dtype=torch.float32)
    assert base.vision.pos_embed.shape == (65, 192) and model.vision.pos_embed.shape == (145, 192)
    assert torch.equal(model.vision.pos_embed, interpolate_pos_embed(base.vision.pos_embed, 12))
    ids = torch.tensor([[1, -200, 5, 6]])
    assert model(ids, torch.zeros(1, 3, 192, 192)).shape == (1, 3 + 144, model.cfg.llm.vocab_size)


def test_train_baby_script_passes_only_flags_its_scripts_accept():
    """Every python command of scripts/train_baby.sh parses with its script's own argument parser."""
    import re
    import shlex

    import eval as eval_cli
    import train
    from synthetic import prepare, pretrain_tower

    parsers = {"train.py": train.build_parser(), "eval.py": eval_cli.build_parser(),
               "synthetic/prepare.py": prepare.build_parser(), "synthetic/pretrain_tower.py": pretrain_tower.build_parser()}
    text = (ROOT / "scripts" / "train_baby.sh").read_text().replace("\\\n", " ")
    common = re.search(r"^common=\((.*?)\)$", text, re.S | re.M).group(1)
    text = text.replace('"${common[@]}"', " ".join(common.split())).replace("$work", "W").replace("$dtype", "float32")
    text = text.replace("$bench", "scene")
    commands = [shlex.split(line.strip()) for line in text.splitlines() if line.strip().startswith("python ")]
    assert sum(c[1] == "train.py" for c in commands) == 2 and any(c[1] == "synthetic/pretrain_tower.py" for c in commands)
    for command in commands:
        if command[1] == "scripts/plot_loss.py":
            continue
        parsers[command[1]].parse_args(command[2:])  # argparse exits (failing the test) on an unknown or bad flag


def test_tiles_find_objects_one_view_cannot():
    """scripts/tiled_demo.py on an 8 x 8 mosaic (1000 px): the shipped baby, tiled, boxes objects at rotated IoU >= 0.5
    in the mosaic's pixels that one shrunk view misses (measured: 20 against 0)."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "tiled_demo.py"), "--cells", "8", "--overlaps", "0",
                        "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith(("| one view", "| tiles"))]
    matched = {cells[0].strip().split(" (")[0].split(",")[0]: int(cells[4]) for cells in rows}
    assert set(matched) == {"one view", "tiles of 125 px"}, r.stdout
    assert matched["tiles of 125 px"] >= 12 and matched["tiles of 125 px"] > 2 * matched["one view"], r.stdout
