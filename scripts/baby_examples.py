"""The shipped Baby GeoChat examples: one scene per task with its true answer, and what the model says.

    python scripts/baby_examples.py [--checkpoint checkpoints/baby-geochat]

Runs `sample.py --json` for every example below and writes the checkpoint's examples/expected.json
(the command's arguments, the true answer from the synthetic generator, the model's answer and token
ids), which tests/test_baby.py replays. The three scenes are held-out scenes of the baby's dataset
(seed 0, test split), so every true answer can be checked by eye in the pictures.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (image, sample.py arguments, the true answer); the boxes are the generator's exact ones
EXAMPLES = [
    ("scene_1.png", ["--task", "grounding"],
     "The image shows a water scene with <p>two ships</p> {<55><20><61><45>|<39>}{<20><51><39><59>|<83>}."),
    ("scene_1.png", ["--task", "scene"], "water"),
    ("scene_2.png", ["--task", "refer", "--prompt", "the plane"], "{<14><65><39><89>|<63>}"),
    ("scene_2.png", ["--task", "vqa", "--prompt", "How many buildings are there in the image?"], "2"),
    ("scene_3.png", ["--task", "identify", "--box", "{<12><18><33><31>|<18>}"], "A building."),
    ("scene_3.png", ["--task", "vqa", "--prompt", "Is there a ship in the image?"], "No"),
]


def run_example(checkpoint: Path, image: str, args: list) -> dict:
    """sample.py --json on one example: its JSON answer."""
    cmd = [sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(checkpoint), "--image",
           str(checkpoint / "examples" / image), *args, "--json", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"sample.py failed on {image} {' '.join(args)}: {r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "baby-geochat", help="Baby GeoChat directory")
    args = p.parse_args(argv)
    rows = []
    for image, sample_args, truth in EXAMPLES:
        got = run_example(args.checkpoint, image, sample_args)
        rows.append({"image": image, "args": sample_args, "truth": truth, "answer": got["answer"],
                     "token_ids": got["token_ids"]})
        print(f"{image} {' '.join(sample_args)}\n  truth:  {truth}\n  answer: {got['answer']}")
    (args.checkpoint / "examples" / "expected.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
