"""Bad input to every entry point: exit code 2, one line on stderr naming the file or flag, nothing written or lost.

sample.py has its own table (tests/test_sample_cli.py, in-process); this one runs the other entry points as a
user would, in subprocesses.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BABY = ROOT / "checkpoints" / "baby-geochat"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "images").mkdir()
    (d / "a_file").write_text("precious")
    (d / "list_config").mkdir()
    (d / "list_config" / "config.json").write_text("[1, 2]")
    (d / "list_config" / "tokenizer.model").write_bytes((BABY / "tokenizer.model").read_bytes())
    (d / "binary.jsonl").write_bytes(bytes(range(256)))
    (d / "scene.jsonl").write_text(json.dumps({"question_id": "a/1.png", "image": "1.png", "text": "Classify."}) + "\n")
    (d / "answers.jsonl").write_text(json.dumps({"question_id": "a/1.png", "answer": "a", "bench": "scene"}) + "\n")
    (d / "data.json").write_text(json.dumps([{"id": "0", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yes"}]}]))
    (d / "corpus.txt").write_text("two planes\n")
    return d


def with_value(argv, flag, value):
    """argv with flag's value replaced."""
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def cases(d):
    run = ["eval.py", "run", "--bench", "scene", "--questions", f"{d}/scene.jsonl", "--image-folder", f"{d}/images",
           "--checkpoint", str(BABY), "--answers", f"{d}/out.jsonl"]
    train = ["train.py", "--checkpoint", str(BABY), "--data", f"{d}/data.json", "--image-folder", f"{d}/images",
             "--out", f"{d}/run"]
    return [
        (["eval.py", "score", "--bench", "vqa", "--answers", f"{d}/answers.jsonl"], "holds answers of bench scene"),
        (["eval.py", "score", "--bench", "scene", "--answers", f"{d}/binary.jsonl"], "not a text file"),
        (["eval.py", "score", "--bench", "scene", "--answers", f"{d}/missing.jsonl"], "missing.jsonl"),
        (["eval.py", "score", "--bench", "referring", "--answers", f"{d}/answers.jsonl", "--gt-size", "0"], "--gt-size"),
        (["eval.py", "score", "--bench", "referring", "--answers", f"{d}/answers.jsonl", "--gt-size", "nan"], "--gt-size"),
        (with_value(run, "--answers", f"{d}/answers.jsonl") + ["--batch-size", "0"], "--batch-size must be a positive number"),
        (run + ["--limit", "-1"], "--limit must be a positive number"),
        (run + ["--max-new-tokens", "0"], "--max-new-tokens must be a positive number"),
        (with_value(run, "--image-folder", f"{d}/nowhere"), "no such directory"),
        (with_value(run, "--questions", f"{d}/binary.jsonl"), "not a text file"),
        (with_value(run, "--checkpoint", f"{d}/list_config"), "config.json: expected a JSON object"),
        (["scripts/convert.py", str(BABY), f"{d}/a_file"], "exists and is not a directory"),
        (["scripts/convert.py", f"{d}/list_config", f"{d}/converted"], "config.json: expected a JSON object"),
        (["synthetic/prepare.py", "scenes", "--out", f"{d}/a_file"], "exists and is not a directory"),
        (["synthetic/prepare.py", "scenes", "--out", f"{d}/synth", "--size", "4"], "--size must be >= 16"),
        (["synthetic/prepare.py", "scenes", "--out", f"{d}/synth", "--multi-turn-prob", "2"], "--multi-turn-prob"),
        (["synthetic/prepare.py", "tokenizer", "--corpus", f"{d}/corpus.txt", "--out", f"{d}/t.model", "--vocab-size", "5"],
         "--vocab-size must be >= 300"),
        (train + ["--batch-size", "0"], "--batch-size must be >= 1"),
        (with_value(train, "--data", f"{d}/missing.json"), "missing.json"),
        (with_value(train, "--image-folder", f"{d}/nowhere"), "nowhere"),
        (train + ["--resume"], "holds no checkpoint"),
        (train + ["--train-projector", "--mode", "full"], "--train-projector goes with --mode lora"),
        (with_value(train, "--checkpoint", f"{d}/list_config"), "config.json: expected a JSON object"),
    ]


def snapshot(d):
    return {p: p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_bad_input_table(files):
    table = cases(files)
    assert len(table) >= 20
    for argv, message in table:
        before = snapshot(files)
        r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
        lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("train.py: warning")]
        assert r.returncode == 2, (argv, r.returncode, r.stderr[-800:])
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, (argv, r.stderr[-800:])
        assert snapshot(files) == before, argv  # nothing written, nothing lost
