"""`eval.py run` end to end on a tiny random checkpoint: batched, resumable, missing images reported."""

import json
import os
import signal
import subprocess
import sys
import time
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
    assert f"{answers}: 2 questions answered before are kept and skipped" in second.stderr  # a resume says so
    assert "answered before" not in first.stderr


def test_batched_answers_equal_one_by_one(tiny_checkpoint, tmp_path):
    qfile, folder = write_bench(tmp_path)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert run(tiny_checkpoint, qfile, folder, a, "--batch-size", "3").returncode == 0
    assert run(tiny_checkpoint, qfile, folder, b, "--batch-size", "1").returncode == 0
    assert [json.loads(x)["answer"] for x in a.read_text().splitlines()] == [json.loads(x)["answer"] for x in b.read_text().splitlines()]


def test_question_prompts_are_the_reference_scripts():
    # scene and VQA files carry their whole prompt; referring rows by type; region captions get the [identify] form
    vqa = "Is there a road?\nAnswer the question using a single word or phrase."
    assert geochat_eval.question_prompt("vqa", {"text": vqa}) == vqa
    assert geochat_eval.question_prompt("scene", {"text": " Classify. "}) == "Classify."
    assert geochat_eval.question_prompt("referring", {"question": "the white plane", "type": "ref"}) == \
        "[refer] Give me the location of <p> the white plane </p>"
    assert geochat_eval.question_prompt("referring", {"question": "all planes", "type": "grounding"}) == "[grounding]all planes"
    assert geochat_eval.question_prompt("region_captioning", {"question": "{<1><2><3><4>|<5>}"}) == \
        "[identify] What is the object present at {<1><2><3><4>|<5>}"


def test_failed_and_truncated_answers_are_generated_again(tiny_checkpoint, tmp_path):
    qfile, folder = write_bench(tmp_path)
    answers = tmp_path / "answers.jsonl"
    assert run(tiny_checkpoint, qfile, folder, answers).returncode == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert rows[-1]["answer"] is None and all(r["bench"] == "scene" for r in rows)
    Image.new("RGB", (30, 30), "white").save(folder / "missing.png")  # the image is there now
    answers.write_text(answers.read_text() + '{"question_id": "forest/img9.png", "ans')  # a write cut short by a crash
    again = run(tiny_checkpoint, qfile, folder, answers)
    assert again.returncode == 0, again.stderr
    assert "dropping a truncated last line" in again.stderr
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["forest/img0.png", "forest/img1.png", "forest/img2.png", "river/missing.png"]
    assert all(isinstance(r["answer"], str) for r in rows)
    assert json.loads(again.stdout.strip().splitlines()[-1])["failed"] == 0


def test_run_refuses_bad_input_before_loading_the_model(tiny_checkpoint, tmp_path):
    qfile, folder = write_bench(tmp_path)
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"question_id": 1, "answer": "yes", "bench": "vqa"}) + "\n")
    before = answers.read_text()
    cases = [
        (["--image-folder", str(tmp_path / "nowhere")], "no such directory"),
        ([], "holds answers of bench 'vqa', not 'scene'"),
        (["--limit", "-1"], "--limit must be a positive number"),
        (["--batch-size", "0"], "--batch-size must be a positive number"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be a positive number"),
    ]
    for extra, message in cases:
        r = run(tiny_checkpoint, qfile, folder, answers, *extra)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
        assert answers.read_text() == before
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text(json.dumps({"question_id": 1, "image": "img0.png"}) + "\n")
    r = run(tiny_checkpoint, no_text, folder, tmp_path / "new.jsonl")
    assert r.returncode == 2 and "question 1 has no 'text' text" in r.stderr


def test_unknown_bench_is_an_argparse_error(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "run", "--bench", "nope", "--questions", "q", "--image-folder", "f",
                        "--checkpoint", "c", "--answers", "a"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_ctrl_c_keeps_the_answers_so_far(tiny_checkpoint, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), "green").save(folder / "a.png")
    qfile = tmp_path / "many.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": i, "image": "a.png", "text": "What is it?"}) + "\n" for i in range(5000)))
    answers = tmp_path / "answers.jsonl"
    proc = subprocess.Popen([sys.executable, str(ROOT / "eval.py"), "run", "--bench", "vqa", "--questions", str(qfile),
                             "--image-folder", str(folder), "--checkpoint", str(tiny_checkpoint), "--answers", str(answers),
                             "--device", "cpu", "--max-new-tokens", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and (not answers.exists() or answers.stat().st_size == 0):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: the answers so far are kept" in err and "Traceback" not in err
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert 1 <= len(rows) < 5000 and all(r["bench"] == "vqa" and isinstance(r["answer"], str) for r in rows)


def test_run_generates_up_to_256_tokens_like_the_reference_scripts():
    args = geochat_eval.build_parser().parse_args(["run", "--bench", "referring", "--questions", "q", "--image-folder", "f",
                                                   "--checkpoint", "c", "--answers", "a"])
    assert args.max_new_tokens == 256  # every bench: six or more boxes are not cut short


def test_compiled_run_reuses_one_graph_across_batches(tiny_checkpoint, tmp_path):
    """--compile: two batches of 2 run on one graph and one KV cache (no recompilation), with the eager answers."""
    qfile, folder = write_bench(tmp_path)
    questions = [json.loads(line) for line in qfile.read_text().splitlines()][:3]
    questions.append(dict(questions[0], question_id="forest/again.png"))
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    eager, compiled = tmp_path / "eager.jsonl", tmp_path / "compiled.jsonl"
    assert run(tiny_checkpoint, qfile, folder, eager, "--batch-size", "2").returncode == 0
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "run", "--bench", "scene", "--questions", str(qfile),
                           "--image-folder", str(folder), "--checkpoint", str(tiny_checkpoint), "--answers",
                           str(compiled), "--device", "cpu", "--max-new-tokens", "4", "--batch-size", "2", "--compile"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TORCH_LOGS": "recompiles"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Recompiling" not in proc.stderr, proc.stderr[-3000:]
    answers = [[json.loads(x)["answer"] for x in f.read_text().splitlines()] for f in (eager, compiled)]
    assert answers[0] == answers[1] and len(answers[0]) == 4
