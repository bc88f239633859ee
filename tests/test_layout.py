"""The repository's shape: the model imports no data code, and every command line explains itself."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_model_pulls_in_no_data_code():
    code = ("import sys, geochat, lora\n"
            "print(sorted(m for m in ('data', 'PIL', 'sentencepiece', 'synthetic', 'numpy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "data" not in r.stdout and "PIL" not in r.stdout and "sentencepiece" not in r.stdout, r.stdout


@pytest.mark.parametrize("command", [
    ["sample.py"], ["train.py"], ["eval.py"], ["eval.py", "run"], ["eval.py", "score"],
    ["synthetic/prepare.py", "scenes"], ["synthetic/prepare.py", "tokenizer"], ["scripts/convert.py"],
])
def test_help_explains_every_option_and_shows_defaults(command):
    r = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("usage:"), r.stderr
    lines = r.stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  -") and not line.startswith("  -h, --help"):
            has_help = len(re.split(r"\s{2,}", line.strip(), maxsplit=1)) == 2 or \
                (i + 1 < len(lines) and lines[i + 1].startswith(" " * 8) and not lines[i + 1].strip().startswith("-"))
            assert has_help, f"{' '.join(command)}: no help text for {line.strip()}"
    if command != ["eval.py"]:
        assert "(default:" in r.stdout, "defaults are not shown (argparse.ArgumentDefaultsHelpFormatter)"


def test_convert_refuses_a_destination_it_would_overwrite(tmp_path):
    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"precious")
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    for out, message in ((a_file, "exists and is not a directory"), (full, "the directory is not empty")):
        r = subprocess.run([sys.executable, "scripts/convert.py", str(ROOT / "checkpoints" / "baby-geochat"), str(out)],
                           capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert a_file.read_bytes() == b"precious" and (full / "config.json").read_text() == "{}"
    r = subprocess.run([sys.executable, "scripts/convert.py", str(tmp_path / "nothing"), str(tmp_path / "new")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "new").exists()
