"""`eval.py run` end to end on a tiny random checkpoint: batched, resumable, missing images reported."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

import eval as geochat_eval

ROOT = Path(__file__).resolve().parents[1]


def write_bench(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (40 + 10 * i, 30), colour).save(folder / f"img{i}.png")
    questions = [
        {"question_id": f"forest/img{i}.png", "image": f"img{i}.png", "ground_truth": "forest",
         "text": "Classify the image.\nClassify the image from the following classes: forest, river. Answer in one word or a short phrase."}
        for i in range(3)
    ] + [{"question_id": "river/missing.png", "image": "missing.png", "ground_truth": "river", "text": "Classify."}]
    qfile = tmp_path / "scene.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return qfile, folder


def run(tiny_checkpoint, qfile, folder, answers, *extra):
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), "run", "--bench", "scene", "--questions", str(qfile),
                           "--image-folder", str(folder), "--checkpoint", str(tiny_checkpoint), "--answers", str(answers),
                           "--device", "cpu", "--max-new-tokens", "4", *extra], capture_output=True, text=True, cwd=ROOT)


def test_run_scene_batched_resumable(tiny_checkpoint, tmp_path):
    qfile, folder = write_bench(tmp_path)
    answers = tmp_path / "answers.jsonl"
    first = run(tiny_checkpoint, qfile, folder, answers, "--limit", "2", "--batch-size", "2")
    assert first.returncode == 0, first.stderr
    assert len(answers.read_text().splitlines()) == 2
    second = run(tiny_checkpoint, qfile, folder, answers, "--batch-size", "3")
    assert second.returncode == 0, second.stderr
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["forest/img0.png", "forest/img1.png", "forest/img2.png", "river/missing.png"]
    assert rows[-1]["answer"] is None and "missing.png" in rows[-1]["error"]
    assert all(isinstance(r["answer"], str) for r in rows[:3])
    metrics = json.loads(second.stdout.strip().splitlines()[-1])
    assert metrics["n"] == 4 and metrics["failed"] == 1 and metrics["correct"] == sum(r["answer"] == "forest" for r in rows)
    assert "missing or unreadable images" in second.stderr


def test_batched_answers_equal_one_by_one(tiny_checkpoint, tmp_path):
    qfile, folder = write_bench(tmp_path)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert run(tiny_checkpoint, qfile, folder, a, "--batch-size", "3").returncode == 0
    assert run(tiny_checkpoint, qfile, folder, b, "--batch-size", "1").returncode == 0
    assert [json.loads(x)["answer"] for x in a.read_text().splitlines()] == [json.loads(x)["answer"] for x in b.read_text().splitlines()]


def test_question_prompts_follow_the_task_formats():
    assert geochat_eval.question_prompt("vqa", {"text": "Is there a road?"}) == \
        "Is there a road?\nAnswer the question using a single word or phrase."
    assert geochat_eval.question_prompt("referring", {"question": "the white plane"}) == \
        "[refer] Give me the location of <p> the white plane </p>"
    assert geochat_eval.question_prompt("region_caption", {"question": "{<1><2><3><4>|<5>}"}) == \
        "[identify] What is the object present at {<1><2><3><4>|<5>}"
    assert geochat_eval.question_prompt("grounding_description", {}) == "[grounding] Describe the image in detail."


def test_unknown_bench_is_an_argparse_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "run", "--bench", "nope", "--questions", "q", "--image-folder", "f",
                        "--checkpoint", "c", "--answers", "a"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "invalid choice" in r.stderr
