"""Baby GeoChat: the shipped checkpoint answers deterministically, and train.py learns from scratch."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

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

    sys.path.insert(0, str(ROOT / "scripts"))
    import plot_loss
    import score_descriptions

    parsers = {"train.py": train.build_parser(), "eval.py": eval_cli.build_parser(),
               "synthetic/prepare.py": prepare.build_parser(), "synthetic/pretrain_tower.py": pretrain_tower.build_parser(),
               "scripts/score_descriptions.py": score_descriptions.build_parser(),
               "scripts/plot_loss.py": plot_loss.build_parser()}
    text = (ROOT / "scripts" / "train_baby.sh").read_text().replace("\\\n", " ")
    for name, items in re.findall(r"^(\w+)=\((.*?)\)$", text, re.S | re.M):  # the script's bash arrays, expanded
        text = text.replace('"${%s[@]}"' % name, " ".join(items.split()))
    text = text.replace("$work", "W").replace("$dtype", "float32").replace("$bench", "scene")
    assert "[@]" not in text
    commands = [shlex.split(line.strip(), comments=True) for line in text.splitlines() if line.strip().startswith("python ")]
    assert sum(c[1] == "train.py" for c in commands) == 3 and any(c[1] == "synthetic/pretrain_tower.py" for c in commands)
    for command in commands:
        parsers[command[1]].parse_args(command[2:])  # argparse exits (failing the test) on an unknown or bad flag


def test_tiles_find_objects_one_view_cannot():
    """scripts/tiled_demo.py on an 8 x 8 mosaic (1000 px): the shipped baby, tiled, boxes objects at rotated IoU >= 0.5
    in the mosaic's pixels that one shrunk view misses (measured: 28 against 0; the 6-layer baby 35, the November baby 27)."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "tiled_demo.py"), "--cells", "8", "--overlaps", "0",
                        "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith(("| one view", "| tiles"))]
    matched = {cells[0].strip().split(" (")[0].split(",")[0]: int(cells[4]) for cells in rows}
    assert set(matched) == {"one view", "tiles of 125 px"}, r.stdout
    assert matched["tiles of 125 px"] >= 12 and matched["tiles of 125 px"] > 2 * matched["one view"], r.stdout


def test_diagnosis_tells_answers_that_follow_the_class_from_answers_that_ignore_it():
    """scripts/diagnose_baby.py measurement 5: the within-scene AUC and where [refer] boxes land."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from diagnose_baby import refer_box_shape, refer_landing, within_scene_auc

    follows = [(0, True, 2.0), (0, False, -1.0), (0, False, -3.0), (1, True, 0.5), (1, False, 0.4)]
    assert within_scene_auc(follows) == 1.0
    # the same margins for every class of a scene, however the scenes differ: the class is ignored
    ignores = [(0, True, 2.0), (0, False, 2.0), (1, True, -1.0), (1, False, -1.0), (1, False, -1.0)]
    assert within_scene_auc(ignores) == 0.5
    # pairs are only formed within a scene: a scene whose margins are all high does not count against another's
    assert within_scene_auc([(0, False, 5.0), (0, True, 6.0), (1, True, 0.0), (1, False, -1.0)]) == 1.0

    scene = {"image": "test_000000.png", "objects": [{"grid": [10, 10, 30, 30, 0]}, {"grid": [60, 60, 90, 90, 0]}]}
    rows = [{"type": "ref", "image": scene["image"], "obj_ids": [0], "answer": "{<11><10><30><31>|<0>}"},
            {"type": "ref", "image": scene["image"], "obj_ids": [0], "answer": "{<60><62><88><90>|<0>}"},
            {"type": "ref", "image": scene["image"], "obj_ids": [1], "answer": "{<40><5><50><15>|<0>}"},
            {"type": "ref", "image": scene["image"], "obj_ids": [1], "answer": "no box here"},
            {"type": "grounding", "image": scene["image"], "obj_ids": [0, 1], "answer": "{<11><10><30><31>|<0>}"}]
    assert refer_landing(rows, [scene]) == {"2": {"target": 1, "other": 1, "nothing": 1, "no box": 1}}

    # the boxes on their target: a long object answered at the wrong angle passes only with the true one
    ship = {"image": "test_000001.png", "objects": [{"class": "ship", "grid": [40, 45, 70, 55, 30]}]}
    rows = [{"type": "ref", "image": ship["image"], "obj_ids": [0], "answer": "{<40><45><70><55>|<80>}"},
            {"type": "ref", "image": ship["image"], "obj_ids": [0], "answer": "{<41><45><70><56>|<30>}"},
            {"type": "ref", "image": ship["image"], "obj_ids": [0], "answer": "{<2><2><8><8>|<30>}"}]
    shape = refer_box_shape(rows, [ship])
    assert shape["distinct angles"] == 2
    assert shape["by class"]["ship"] == {"on target": 2, "acc@0.5": 0.5, "acc@0.5 true angle": 1.0,
                                         "centre error": pytest.approx(0.5 * math.dist((55, 50), (55.5, 50.5)), abs=1e-3)}


def test_ground_measurement_scores_answers_as_training_labels_them_on_drawn_and_bare_scenes(tmp_path):
    """scripts/diagnose_baby.py measurement 6: answer log-probabilities of a padded batch equal the unpadded ones,
    the bare scene is the drawn one without its objects, and the shipped baby names the ground of both."""
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    import data
    from diagnose_baby import answer_logprobs, ground_choice, read_annotations
    from geochat import GeoChat
    from synthetic.scenes import GROUNDING_PROMPT, description_head, make_scene

    model = GeoChat.from_pretrained(BABY, dtype=torch.float32).eval()
    tokenizer = data.Tokenizer(BABY / "tokenizer.model")
    paths = write_dataset(tmp_path / "synth", n_train_images=1, n_test_images=4, seed=0, records_per_image=1)
    anns = read_annotations(paths["images"].parent, "test", -1)
    image = data.preprocess_image(data.load_image(paths["images"] / anns[0]["image"]), 128)
    answers = ["water", description_head("urban")]  # 1-2 tokens and 7-8: the batch is padded
    got = answer_logprobs(model, tokenizer, GROUNDING_PROMPT, answers, image)
    for answer, value in zip(answers, got):
        turns = [{"from": "human", "value": "<image>\n" + GROUNDING_PROMPT}, {"from": "gpt", "value": answer}]
        ids, labels = data.encode_conversation(tokenizer, turns, "llava_v1")
        with torch.no_grad():
            log_probs = model(torch.tensor([ids]), image[None])[0].log_softmax(-1)  # (T + 63, vocab)
        shift = model.n_image_tokens - 1  # positions after the image placeholder move by this much
        want = sum(float(log_probs[t - 1 + shift, ids[t]]) for t in range(1, len(ids) - 1) if labels[t] != data.IGNORE_INDEX)
        assert float(value) == pytest.approx(want, abs=1e-4)  # the closing </s> left out

    with_objects = next(a for a in anns if a["objects"])
    drawn = data.load_image(paths["images"] / with_objects["image"])
    bare, bare_ann = make_scene(with_objects["seed"], with_objects["size"], draw_objects=False)
    assert bare_ann["scene"] == with_objects["scene"] and drawn.size == bare.size
    changed = (torch.tensor(list(drawn.getdata())) != torch.tensor(list(bare.getdata()))).any(-1).float().mean()
    assert 0 < changed < 0.15  # only the objects' pixels: the same ground texture
    choice = ground_choice(model, tokenizer, paths["images"].parent, anns)
    assert choice["scenes"] == sum(bool(a["objects"]) for a in anns) >= 1
    assert choice["description"] == choice["scene question"] == {"drawn": 1.0, "bare": 1.0}


def test_angle_probe_reads_an_angle_the_features_carry_and_not_one_they_do_not():
    """scripts/diagnose_baby.py measurement 2's angle probe: error in degrees modulo 90, 22.5 when nothing is read."""
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from diagnose_baby import angle_probe_error, patch_angles

    gen = torch.Generator().manual_seed(0)
    angles = torch.rand(2000, generator=gen) * 90
    noise = torch.randn(2000, 16, generator=gen)
    turn = torch.deg2rad(4 * angles)
    carried = torch.cat([torch.stack([torch.cos(turn), torch.sin(turn)], -1) + 0.05 * noise[:, :2], noise[:, 2:]], -1)
    assert angle_probe_error(carried[:1500], angles[:1500], carried[1500:], angles[1500:]) < 2.0
    # angles on both sides of the wrap (87-90 and 0-3 degrees): 89 and 1 lie 2 apart, not 88
    wrapped = (torch.rand(2000, generator=gen) * 6 - 3) % 90
    turn = torch.deg2rad(4 * wrapped)
    carried = torch.cat([torch.stack([torch.cos(turn), torch.sin(turn)], -1) + 0.01 * noise[:, :2], noise[:, 2:]], -1)
    assert angle_probe_error(carried[:1500], wrapped[:1500], carried[1500:], wrapped[1500:]) < 1.0
    assert angle_probe_error(noise[:1500], angles[:1500], noise[1500:], angles[1500:]) > 18.0

    scene = {"objects": [{"class": "ship", "grid": [0, 0, 50, 50, 30]}, {"class": "storage tank", "grid": [50, 50, 100, 100, 0]}]}
    per_patch = patch_angles(scene, 2)  # patch centres at 25 and 75: one ship patch, one tank patch, two of ground
    assert per_patch[0] == 30 and per_patch[1:].isnan().all()


def test_loss_plot_draws_stages_in_order_and_refuses_bad_files(tmp_path, capsys):
    """scripts/plot_loss.py: stages one after the other with a dashed line where each later one begins; a missing or
    malformed metrics file is one line and exit code 2."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import plot_loss

    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in range(1, 11)))
    second.write_text("".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in range(1, 6)))
    out = tmp_path / "loss.png"
    assert plot_loss.main([str(first), str(second), str(out), "--first-stage", "2"]) == 0
    assert "15 steps, loss 3.000 -> 0.400" in capsys.readouterr().out
    image = Image.open(out).convert("RGB")
    x_start = round(plot_loss.MARGIN + (11 - 1) / (15 - 1) * (plot_loss.WIDTH - 2 * plot_loss.MARGIN))  # step 11: stage 3
    red = [x for x in range(image.width) if image.getpixel((x, plot_loss.MARGIN + 1)) == (0xd0, 0x40, 0x40)]
    assert red and min(red) == x_start, (red[:5], x_start)
    assert plot_loss.main([str(tmp_path / "missing.jsonl"), str(out)]) == 2
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    assert plot_loss.main([str(tmp_path / "bad.jsonl"), str(out)]) == 2
    (tmp_path / "short.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert plot_loss.main([str(second), str(tmp_path / "short.jsonl"), str(out)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3 and "missing.jsonl" in errors[0] and "bad.jsonl" in errors[1] and "short.jsonl" in errors[2]


def test_description_score_counts_boxes_on_the_named_class(tmp_path, capsys):
    """scripts/score_descriptions.py: its counts on made-up answers, and the CLI on three held-out scenes."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from score_descriptions import main, score

    from synthetic.scenes import grounded_description

    ann = {"scene": "water", "objects": [{"class": "ship", "box": "{<10><10><20><40>|<0>}"},
                                         {"class": "ship", "box": "{<60><60><70><90>|<30>}"}]}
    truth = grounded_description(ann)
    assert score([truth], [ann]).items() >= {"ground_named": 1, "exact": 1, "boxes": 2, "matched": 2, "matched_any_class": 2}.items()
    # the right boxes named as planes: on objects, not on the class named; a scene's ground named wrong
    wrong_class = "The image shows a desert scene with <p>two planes</p> {<10><10><20><40>|<0>}{<60><60><70><90>|<30>}."
    got = score([wrong_class], [ann])
    assert (got["ground_named"], got["exact"], got["matched"], got["matched_any_class"]) == (0, 0, 0, 2)
    # one box on a ship, one on nothing, one drawn twice on the same ship (matched once: one to one)
    half = "The image shows a water scene with <p>three ships</p> {<10><10><20><40>|<0>}{<80><5><95><20>|<0>}{<10><11><20><40>|<0>}."
    got = score([half], [ann])
    assert (got["boxes"], got["matched"], got["recall"], got["precision"]) == (3, 1, 0.5, 1 / 3)

    paths = write_dataset(tmp_path / "synth", n_train_images=1, n_test_images=3, seed=0, records_per_image=1)
    assert main(["--checkpoint", str(BABY), "--data", str(paths["images"].parent), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["scenes"] == 3 and got["boxes"] >= 1 and 0 <= got["matched"] <= got["matched_any_class"] <= got["boxes"]
    assert main(["--checkpoint", str(BABY), "--data", str(tmp_path / "missing")]) == 2
    assert "annotations.jsonl: not found" in capsys.readouterr().err
    assert main(["--data", str(paths["images"].parent), "--batch-size", "0"]) == 2
    (paths["images"] / "test_000001.png").unlink()
    assert main(["--data", str(paths["images"].parent)]) == 2
    assert "test_000001.png: no such image file" in capsys.readouterr().err
