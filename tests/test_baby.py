"""Baby GeoChat: the shipped checkpoint answers deterministically, and train.py learns from scratch."""

import json
import subprocess
import sys
import time
from pathlib import Path

import data

ROOT = Path(__file__).resolve().parents[1]
BABY = ROOT / "checkpoints" / "baby-geochat"


def test_shipped_checkpoint_answers_the_shipped_example_deterministically(tmp_path):
    expected = json.loads((BABY / "examples" / "expected.json").read_text())
    for name, want in expected.items():
        out = tmp_path / f"{name}.png"
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--image", str(BABY / "examples" / name),
                            "--task", "grounding", "--json", "--out", str(out), "--device", "cpu"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
        seconds = time.perf_counter() - t0
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert got["answer"] == want["answer"] and got["token_ids"] == want["token_ids"]
        assert len(got["boxes"]) >= 1 and out.exists()
        assert seconds < 30, f"sample.py took {seconds:.1f} s"


def test_twenty_steps_from_scratch_lower_the_loss(tmp_path):
    paths = data.write_synthetic_dataset(tmp_path / "synth", n_train_images=6, n_test_images=0, seed=1, records_per_image=2)
    tokenizer = data.train_tokenizer(paths["corpus"], tmp_path / "tokenizer.model", vocab_size=400)
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
