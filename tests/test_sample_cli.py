"""sample.py's command line on the shipped Baby GeoChat: bad input is one line and exit code 2, and nothing is written."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import sample
from geochat import GeoChat

ROOT = Path(__file__).resolve().parents[1]
BABY = ROOT / "checkpoints" / "baby-geochat"
LONG_PROMPT = "tennis court " * 400


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A folder of inputs and outputs the cases point at: a photo, a broken image, broken checkpoints."""
    box = tmp_path_factory.mktemp("sandbox")
    shutil.copy(BABY / "examples" / "scene_1.png", box / "photo.png")
    (box / "photo_link.png").symlink_to(box / "photo.png")
    (box / "bad.png").write_text("hello")
    (box / "folder.png").mkdir()
    (box / "read_only").mkdir()
    (box / "read_only").chmod(0o555)
    for name, files in (("config_list", ("model.safetensors", "tokenizer.model")),
                        ("no_tokenizer", ("config.json", "model.safetensors"))):
        (box / name).mkdir()
        for f in files:
            (box / name / f).symlink_to(BABY / f)
    (box / "config_list" / "config.json").write_text("[1, 2]")
    model = GeoChat.from_pretrained(BABY, dtype=torch.float32)
    with torch.no_grad():
        model.llm.norm.weight.fill_(float("nan"))
    model.save_pretrained(box / "nan_weights", tokenizer_model=BABY / "tokenizer.model")
    return box


def cli(*argv):
    """sample.main in this process: its exit code."""
    try:
        sample.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.is_dir(), p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")}


BOX_SYNTAX = "malformed --box"
BAD_INPUT = [  # (case, arguments after --image {box}/photo.png --device cpu, expected part of the one error line)
    ("temperature nan", ["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    ("temperature negative", ["--temperature", "-0.5"], "--temperature must be a finite number >= 0"),
    ("temperature inf", ["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    ("top-k zero", ["--temperature", "1", "--top-k", "0"], "--top-k must be >= 1"),
    ("top-p zero", ["--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
    ("top-p above one", ["--temperature", "1", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    ("top-p nan", ["--temperature", "1", "--top-p", "nan"], "--top-p must be in (0, 1]"),
    ("top-p greedy", ["--top-p", "0.9"], "--top-p only applies when sampling"),
    ("seed greedy", ["--seed", "3"], "--seed only applies when sampling"),
    ("seed too large", ["--temperature", "1", "--seed", str(2 ** 64)], "--seed must be in [0, 2**64)"),
    ("no new tokens", ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ("box x1 > x2", ["--task", "identify", "--box", "{<50><10><20><30>|<0>}"], "x1 <= x2 and y1 <= y2"),
    ("box y1 > y2", ["--task", "identify", "--box", "{<10><50><20><30>}"], "x1 <= x2 and y1 <= y2"),
    ("box angle", ["--task", "identify", "--box", "{<10><10><20><30>|<400>}"], "angle must be in [-360, 360]"),
    ("box off the grid", ["--task", "identify", "--box", "{<10><10><20><101>|<0>}"], "0-100 grid"),
    ("box three numbers", ["--task", "identify", "--box", "{<1><2><3>|<4>}"], BOX_SYNTAX),
    ("box decimals", ["--task", "identify", "--box", "{<1.5><2><3><4>|<0>}"], BOX_SYNTAX),
    ("box and more", ["--task", "identify", "--box", "{<1><2><3><4>} and {<5><6><7><8>}"], BOX_SYNTAX),
    ("identify without box", ["--task", "identify"], "--task identify needs --box"),
    ("identify with prompt", ["--task", "identify", "--box", "{<1><2><3><4>}", "--prompt", "hi"],
     "--task identify does not use --prompt"),
    ("box for grounding", ["--box", "{<1><2><3><4>}"], "--task grounding does not use --box"),
    ("classes for vqa", ["--task", "vqa", "--classes", "a, b"], "--task vqa does not use --classes"),
    ("prompt for scene", ["--task", "scene", "--prompt", "What is it?"], "--task scene does not use --prompt"),
    ("empty classes", ["--task", "scene", "--classes", " , "], "--classes ' , ' names no class"),
    ("scene needs classes", ["--task", "scene", "--checkpoint", "{box}/config_list"], "--task scene needs --classes"),
    ("refer without prompt", ["--task", "refer"], "--task refer needs --prompt"),
    ("interactive batch", ["--interactive", "--image", "{box}/photo.png", "--image", "{box}/photo.png"],
     "--interactive chats about one image"),
    ("interactive json", ["--interactive", "--json"], "--interactive does not support --json"),
    ("out is the photo", ["--out", "{box}/photo.png"], "is the input image {box}/photo.png"),
    ("out is the photo, by a link", ["--out", "{box}/photo_link.png"], "is the input image"),
    ("out is the photo, by a detour", ["--out", "{box}/folder.png/../photo.png"], "is the input image"),
    ("out missing folder", ["--out", "{box}/nowhere/boxes.png"], "directory {box}/nowhere does not exist"),
    ("out under a file", ["--out", "{box}/bad.png/boxes.png"], "{box}/bad.png is not a directory"),
    ("out is a folder", ["--out", "{box}/folder.png"], "{box}/folder.png is a directory"),
    ("out without extension", ["--out", "{box}/boxes"], "needs an image extension such as .png"),
    ("out unknown extension", ["--out", "{box}/boxes.xyz"], "unknown image format '.xyz'"),
    ("missing checkpoint", ["--checkpoint", "{box}/nowhere"], "checkpoint directory {box}/nowhere not found"),
    ("config not an object", ["--checkpoint", "{box}/config_list"], "config_list/config.json: expected a JSON object"),
    ("missing image", ["--image", "{box}/nope.png"], "{box}/nope.png: no such image file"),
    ("not an image", ["--image", "{box}/bad.png"], "not an image"),
    ("no tokenizer", ["--checkpoint", "{box}/no_tokenizer"], "tokenizer.model"),
    ("prompt too long", ["--task", "chat", "--prompt", LONG_PROMPT], "context holds"),
    ("nan weights", ["--checkpoint", "{box}/nan_weights"], "logits are NaN or infinite after the prompt"),
]


@pytest.mark.parametrize("argv,message", [case[1:] for case in BAD_INPUT], ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, sandbox, capsys):
    before = snapshot(sandbox)
    argv = [a.replace("{box}", str(sandbox)) for a in argv]
    photo = [] if "--image" in argv else ["--image", sandbox / "photo.png"]  # a case's own images replace the photo
    code = cli(*photo, "--device", "cpu", *argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert message.replace("{box}", str(sandbox)) in err, err
    assert snapshot(sandbox) == before


def test_bad_input_from_a_real_process_is_one_line(sandbox):
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--image", str(sandbox / "photo.png"), "--top-k", "0",
                        "--temperature", "1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and r.stderr == "error: --top-k must be >= 1, got 0\n", r.stderr


def test_device_mps_absent_is_refused(sandbox, capsys):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    assert cli("--image", sandbox / "photo.png", "--device", "mps") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device mps: no MPS device") and len(err.splitlines()) == 1


def test_out_in_a_read_only_folder_is_refused_up_front(sandbox, capsys):
    if os.access(sandbox / "read_only", os.W_OK):
        pytest.skip("running as root: a read-only mode does not stop writing")
    assert cli("--image", sandbox / "photo.png", "--device", "cpu", "--out", sandbox / "read_only" / "boxes.png") == 2
    err = capsys.readouterr().err
    assert "read_only is not writable" in err and len(err.splitlines()) == 1


def test_answers_are_printed_even_when_drawing_fails(sandbox, tmp_path, capsys, monkeypatch):
    def disk_full(image, boxes):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sample, "draw_boxes", disk_full)
    code = cli("--image", sandbox / "photo.png", "--image", BABY / "examples" / "scene_2.png", "--device", "cpu",
               "--json", "--out", tmp_path / "boxes.png")
    out, err = capsys.readouterr()
    assert code == 2
    assert len([json.loads(line) for line in out.splitlines()]) == 2
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "boxes_0.png" in err, err


def test_scene_prompt_is_the_bench_wording(sandbox):
    args = sample.parse_args(["--image", "x.png", "--task", "scene", "--classes", "airport,beach , dense residential"])
    want = data.task_prompt("scene", classes=["airport", "beach", "dense residential"])
    assert sample.user_text(args) == data.IMAGE_PLACEHOLDER + "\n" + want
    detour = ROOT / "checkpoints" / ".." / "checkpoints" / "baby-geochat"  # the shipped model by another spelling
    args = sample.parse_args(["--image", "x.png", "--task", "scene", "--checkpoint", str(detour)])
    assert sample.user_text(args).endswith(data.task_prompt("scene", classes="farmland, water, desert, urban"))


def chat(capsys, monkeypatch, photo, questions):
    """An --interactive session fed `questions`, then Ctrl-D: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(q + "\n" for q in questions)))
    code = cli("--image", photo, "--device", "cpu", "--task", "chat", "--prompt", "What is in the image?",
               "--max-new-tokens", "6", "--interactive")
    return (code, *capsys.readouterr())


def test_interactive_refuses_a_turn_too_long_and_keeps_the_chat(sandbox, capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "readline", raising=False)
    code, out, err = chat(capsys, monkeypatch, sandbox / "photo.png", [LONG_PROMPT, "", "Where are the ships?"])
    assert code == 0, err
    assert len(err.splitlines()) == 1 and "does not fit" in err, err
    assert "readline" in sys.modules  # line editing and history for input()
    assert out.endswith("USER: \n")  # Ctrl-D: the shell's prompt starts on a new line
    _, plain, _ = chat(capsys, monkeypatch, sandbox / "photo.png", ["Where are the ships?"])
    answers = re.findall(r"ASSISTANT: (.*)", out)
    assert len(answers) == 2 and out.count("USER: ") == 5  # the first question, three asked, the last one met Ctrl-D
    assert answers == re.findall(r"ASSISTANT: (.*)", plain)
