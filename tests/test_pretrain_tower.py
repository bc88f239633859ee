"""The baby's vision pretraining: per-patch labels, the CLIP directory it writes, and train.py starting from it."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402
from geochat import GeoChat, GeoChatConfig, load_vision_tower  # noqa: E402
from synthetic import pretrain_tower  # noqa: E402
from synthetic.scenes import GRID_CELLS, OBJECT_CLASSES, cell_objects, grid_answer, make_scene  # noqa: E402
from test_train import setup_dir, tiny_config  # noqa: E402,F401  (setup_dir is a fixture)


def test_cell_objects_give_the_grid_labels_and_find_every_object_that_fills_a_cell():
    found = 0
    for seed in range(60):
        _, ann = make_scene(seed)
        cells = cell_objects(ann)
        assert len(cells) == GRID_CELLS * GRID_CELLS
        digits = grid_answer(ann)
        assert digits == "".join("0" if k < 0 else str(OBJECT_CLASSES.index(ann["objects"][k]["class"]) + 1) for k in cells)
        for k, obj in enumerate(ann["objects"]):
            x1, y1, x2, y2, _ = obj["grid"]
            if (x2 - x1) * (y2 - y1) >= 2 * (100 / GRID_CELLS) ** 2:  # covers two cells' area: some cell is its
                assert k in cells, (seed, obj)
                found += 1
    assert found >= 20


def test_box_values_are_soft_choices_peaked_at_the_true_value_and_the_loss_learns_them():
    """value_targets: each of the five values a distribution over 0-100 peaked at the true integer; a head fitted on
    fixed features with patch_loss picks the true values (so the value term trains what the decoder must emit)."""
    boxes = torch.tensor([[0.10, 0.25, 0.57, 1.00, 45 / 90], [0.0, 0.5, 0.07, 0.33, 0.0]])
    target = pretrain_tower.value_targets(boxes)  # (2, 5, 101)
    assert target.shape == (2, 5, pretrain_tower.BOX_VALUES)
    torch.testing.assert_close(target.sum(-1), torch.ones(2, 5))
    assert target.argmax(-1).tolist() == [[10, 25, 57, 100, 45], [0, 50, 7, 33, 0]]
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 16)  # 2 scenes x 3 patches; patches 0 hold objects
    classes = torch.tensor([[2, 0, 0], [5, 0, 0]])
    cell_boxes = torch.zeros(2, 3, 5)
    cell_boxes[:, 0] = boxes
    head = torch.nn.Linear(16, pretrain_tower.HEAD_OUTPUTS)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        pretrain_tower.patch_loss(head, feats, classes, cell_boxes).backward()
        opt.step()
    picks = head(feats[:, 0])[:, pretrain_tower.N_CLASSES + 5:].unflatten(-1, (5, pretrain_tower.BOX_VALUES)).argmax(-1)
    assert picks.tolist() == [[10, 25, 57, 100, 45], [0, 50, 7, 33, 0]]


def test_a_wrapped_angle_choice_goes_around_at_90_and_its_weight_scales_its_loss_alone():
    """With wrap_angle an angle of 89 is the edge direction of 0 (the box turned by 90 with its sides swapped): its soft
    target puts as much on 0 as on 88 and nothing on 90-100, which are no angles; without it (the shipped tower's) 0 gets
    nearly nothing; the corners' targets never wrap. angle_weight scales the angle's choice term and nothing else."""
    boxes = torch.tensor([[0.01, 0.25, 0.99, 1.00, 89 / 90]])
    target = pretrain_tower.value_targets(boxes, wrap_angle=True)[0]  # (5, 101)
    angle = target[4]
    torch.testing.assert_close(angle[[0, 1]], angle[[88, 87]])
    assert angle.argmax() == 89 and angle[90:].sum() == 0
    assert target[0, 100] < 1e-6 and target[2, 0] < 1e-6  # x1 = 1 does not reach 100, x2 = 99 does not reach 0
    plain = pretrain_tower.value_targets(boxes)[0]
    torch.testing.assert_close(plain[:4], target[:4])
    assert plain[4, 0] < 1e-6 and plain[4, 90] > 0.1
    torch.manual_seed(0)
    feats, classes = torch.randn(1, 2, 16), torch.tensor([[3, 0]])
    cell_boxes = torch.zeros(1, 2, 5)
    cell_boxes[0, 0] = boxes[0]
    head = torch.nn.Linear(16, pretrain_tower.HEAD_OUTPUTS)
    losses = [pretrain_tower.patch_loss(head, feats, classes, cell_boxes, angle_weight=w, wrap_angle=True)
              for w in (0.0, 1.0, 3.0)]
    logits = head(feats[0, 0])[pretrain_tower.N_CLASSES + 5:].view(5, -1)
    angle_term = -(target[4] * logits[4].log_softmax(-1)).sum() / 5 * pretrain_tower.VALUE_WEIGHT
    torch.testing.assert_close(losses[1] - losses[0], angle_term)
    torch.testing.assert_close(losses[2] - losses[0], 3 * angle_term)


def test_scene_counts_are_each_class_counted_and_a_count_head_learns_them_at_every_patch():
    """render's counts are each class's objects in the annotation; count_loss trains every patch to give them
    (a head fitted on fixed features picks each class's count at every patch of its scene)."""
    _, _, _, anns, counts = pretrain_tower.render(0, 1, 6, 64, 4)
    for ann, row in zip(anns, counts.tolist()):
        assert row == [sum(o["class"] == c for o in ann["objects"]) for c in OBJECT_CLASSES]
    assert counts.max() <= pretrain_tower.COUNT_VALUES - 1 and counts.sum() > 0
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 16)  # 2 scenes x 3 patches
    scene_counts = torch.tensor([[0, 2, 0, 1, 3], [1, 0, 0, 0, 0]])
    head = torch.nn.Linear(16, pretrain_tower.COUNT_OUTPUTS)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        pretrain_tower.count_loss(head, feats, scene_counts).backward()
        opt.step()
    picks = head(feats).unflatten(-1, (len(OBJECT_CLASSES), pretrain_tower.COUNT_VALUES)).argmax(-1)  # (2, 3, 5)
    assert torch.equal(picks, scene_counts[:, None, :].expand(-1, 3, -1))


def test_axis_targets_are_the_heading_modulo_180_and_a_box_read_off_the_true_values_passes():
    """axis_targets: (cos 2φ, sin 2φ) of each object patch's direction (φ and φ + 180 one axis), none on ground or round
    tanks; axis_error_deg goes around at 180; object_box_hits: value logits peaked at each object's own numbers on the
    patches it covers pass every object, the same logits shifted by 10 grid units pass none."""
    anns = [make_scene(seed)[1] for seed in range(40)]
    axes, turned = pretrain_tower.axis_targets(anns, GRID_CELLS)
    seen = set()
    for i, ann in enumerate(anns):
        for cell, k in enumerate(cell_objects(ann, GRID_CELLS)):
            has_axis = k >= 0 and ann["objects"][k]["class"] != "storage tank"
            assert bool(turned[i, cell]) == has_axis
            if has_axis:
                phi = math.radians(ann["objects"][k]["direction"])
                torch.testing.assert_close(axes[i, cell], torch.tensor([math.cos(2 * phi), math.sin(2 * phi)]))
                seen.add(ann["objects"][k]["class"])
    assert seen >= {"plane", "ship", "vehicle", "building"}
    as_axis = lambda deg: torch.tensor([[math.cos(math.radians(2 * d)), math.sin(math.radians(2 * d))] for d in deg])
    errors = pretrain_tower.axis_error_deg(as_axis([179.0, 90.0, 30.0]), as_axis([1.0, 0.0, 210.0]))
    torch.testing.assert_close(errors, torch.tensor([2.0, 90.0, 0.0]), atol=1e-4, rtol=0)
    logits = torch.zeros(len(anns), GRID_CELLS * GRID_CELLS, 5, pretrain_tower.BOX_VALUES)
    step, uncovered = 100 / GRID_CELLS, 0
    for i, ann in enumerate(anns):
        cells = cell_objects(ann, GRID_CELLS)
        for k, obj in enumerate(ann["objects"]):
            x1, y1, x2, y2, _ = obj["grid"]
            mine = [c for c, owner in enumerate(cells) if owner == k]
            if not mine:  # a small vehicle covers too little of any cell: it is read off its centre's patch
                mine, uncovered = [int((y1 + y2) / 2 // step) * GRID_CELLS + int((x1 + x2) / 2 // step)], uncovered + 1
                assert cells[mine[0]] == -1
            for c in mine:
                logits[i, c, range(5), torch.tensor(obj["grid"]).round().long()] = 1.0
    assert uncovered > 0
    hits = pretrain_tower.object_box_hits(logits, anns, GRID_CELLS)
    assert sum(n for n, _ in hits.values()) == sum(len(a["objects"]) for a in anns) > 40
    assert all(n == h for n, h in hits.values())
    shifted = torch.zeros_like(logits)
    shifted[..., :4, 10:] = logits[..., :4, :-10]  # every corner 10 grid units on (the angle's choice unchanged)
    shifted[..., 4, :] = logits[..., 4, :]
    assert all(h == 0 for _, h in pretrain_tower.object_box_hits(shifted, anns, GRID_CELLS).values())


def test_per_object_weights_give_every_object_the_same_weight_in_the_box_terms():
    """object_patch_weights: 1 / the patches of each patch's object, 0 on ground (render's scenes against
    cell_objects); patch_loss with them is the class loss plus the box terms averaged per object, where without them
    an object of ten patches weighs ten times an object of one."""
    _, classes, boxes, anns, _ = pretrain_tower.render(0, 1, 12, 128, GRID_CELLS)
    weights = pretrain_tower.object_patch_weights(classes, boxes)
    for i, ann in enumerate(anns):
        cells = cell_objects(ann, GRID_CELLS)
        for cell, k in enumerate(cells):
            assert weights[i, cell].item() == pytest.approx(0.0 if k < 0 else 1 / cells.count(k))
    torch.manual_seed(0)
    feats, classes = torch.randn(1, 4, 16), torch.tensor([[2, 2, 4, 0]])  # a two-patch ship, a one-patch vehicle
    cell_boxes = torch.zeros(1, 4, 5)
    cell_boxes[0, :2] = torch.tensor([0.2, 0.3, 0.5, 0.4, 0.3])
    cell_boxes[0, 2] = torch.tensor([0.7, 0.7, 0.8, 0.75, 0.5])
    head = torch.nn.Linear(16, pretrain_tower.HEAD_OUTPUTS)
    weights = pretrain_tower.object_patch_weights(classes, cell_boxes)
    assert weights.tolist() == [[0.5, 0.5, 1.0, 0.0]]
    plain = pretrain_tower.patch_loss(head, feats, classes, cell_boxes)
    balanced = pretrain_tower.patch_loss(head, feats, classes, cell_boxes, patch_weights=weights)
    per_patch = [pretrain_tower.patch_loss(head, feats[:, [c]], classes[:, [c]], cell_boxes[:, [c]]) for c in range(3)]
    cls = [torch.nn.functional.cross_entropy(head(feats[0, [c]])[:, :pretrain_tower.N_CLASSES], classes[0, [c]])
           for c in range(3)]
    box_terms = [loss - c for loss, c in zip(per_patch, cls)]  # each object patch's box terms alone
    class_loss = plain - sum(box_terms) / 3
    torch.testing.assert_close(balanced, class_loss + ((box_terms[0] + box_terms[1]) / 2 + box_terms[2]) / 2)


def test_count_and_angle_options_are_recorded_and_their_defaults_leave_the_tower_as_before(tmp_path):
    """--count-weight 0, --angle-weight 1 and --axis-weight 0 (the defaults) train the very tower of a run without the
    options; a positive count or axis weight, a wrapped and weighted angle, or --per-object changes it, and each is
    recorded with its metrics (every tower's with object_box_iou50)."""
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    towers = {}
    for name, extra in (("plain", []), ("zero", ["--count-weight", "0", "--angle-weight", "1", "--axis-weight", "0"]),
                        ("counts", ["--count-weight", "1"]), ("angle", ["--wrap-angle", "--angle-weight", "5"]),
                        ("axis", ["--axis-weight", "1"]), ("per_object", ["--per-object"])):
        pretrain_tower.main(["--config", str(tmp_path / "config.json"), "--out", str(tmp_path / name), "--n-train", "8",
                             "--n-test", "4", "--steps", "3", "--batch-size", "4", "--object-scale", "2.5", *extra])
        towers[name] = load_file(str(tmp_path / name / "model.safetensors"))  # 2.5: objects that cover patch centres
    assert all(torch.equal(towers["plain"][k], towers["zero"][k]) for k in towers["plain"])
    assert not all(torch.equal(towers["plain"][k], towers["counts"][k]) for k in towers["plain"])
    assert not all(torch.equal(towers["plain"][k], towers["angle"][k]) for k in towers["plain"])
    assert not all(torch.equal(towers["plain"][k], towers["axis"][k]) for k in towers["plain"])
    assert not all(torch.equal(towers["plain"][k], towers["per_object"][k]) for k in towers["plain"])
    assert json.loads((tmp_path / "per_object" / "pretrain_metrics.json").read_text())["per_object"] is True
    axis = json.loads((tmp_path / "axis" / "pretrain_metrics.json").read_text())
    assert axis["axis_weight"] == 1.0 and 0.0 <= axis["axis_error_deg"] <= 90.0
    angle = json.loads((tmp_path / "angle" / "pretrain_metrics.json").read_text())
    assert angle["angle_weight"] == 5.0 and angle["wrap_angle"] is True and 0.0 <= angle["angle_value_error_deg"] <= 45.0
    metrics = json.loads((tmp_path / "counts" / "pretrain_metrics.json").read_text())
    assert metrics["count_weight"] == 1.0 and 0.0 <= metrics["patch_count_acc"] <= metrics["patch_presence_acc"] <= 1.0
    plain = json.loads((tmp_path / "plain" / "pretrain_metrics.json").read_text())
    assert "patch_count_acc" not in plain and "angle_weight" not in plain and "wrap_angle" not in plain
    assert "axis_weight" not in plain and "axis_error_deg" not in plain and "per_object" not in plain
    assert 0.0 <= plain["object_box_iou50"] <= 1.0


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    """A tower of test_train's tiny config pretrained for a few steps (its second block written as an identity)."""
    root = tmp_path_factory.mktemp("tower")
    (root / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    out = root / "clip"
    pretrain_tower.main(["--config", str(root / "config.json"), "--out", str(out), "--n-train", "8", "--n-test", "4",
                         "--steps", "3", "--batch-size", "4", "--lr", "1e-2"])
    return out


def test_pretrained_tower_is_a_clip_directory_hf_reads_with_our_features(tower_dir):
    transformers = pytest.importorskip("transformers")
    metrics = json.loads((tower_dir / "pretrain_metrics.json").read_text())
    assert set(metrics) >= {"object_patch_acc", "ground_patch_acc", "box_error_grid", "box_value_error_grid", "steps"}
    hf, info = transformers.CLIPVisionModel.from_pretrained(tower_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model = GeoChat(tiny_config())
    load_vision_tower(model, tower_dir)
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ours = model.vision(images)
        states = hf.eval()(pixel_values=images, output_hidden_states=True).hidden_states
    torch.testing.assert_close(ours, states[-2][:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[-1], states[-2])  # the unused last block is an identity


def test_config_with_vision_tower_starts_from_it_and_keeps_it_frozen(setup_dir, tower_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train.main(["--config", str(setup_dir["config"]), "--vision-tower", str(tower_dir), "--tokenizer", str(setup_dir["tokenizer"]),
                "--data", str(setup_dir["data"]), "--image-folder", str(setup_dir["images"]), "--out", str(out), "--device", "cpu",
                "--mode", "full", "--max-steps", "2", "--global-batch", "4", "--batch-size", "2", "--lr", "1e-2",
                "--dtype", "float32"])
    saved = load_file(str(out / "model.safetensors"))
    pretrained = GeoChat(tiny_config())
    load_vision_tower(pretrained, tower_dir)
    for key, value in pretrained.vision.state_dict().items():
        assert torch.equal(saved["vision." + key], value), key  # loaded, then frozen
    fresh = GeoChat(tiny_config())
    train.init_weights(fresh, 0)
    assert not torch.equal(saved["vision.blocks.0.attn.q_proj.weight"], fresh.vision.blocks[0].attn.q_proj.weight)
    assert not torch.equal(saved["llm.layers.0.attn.q_proj.weight"], fresh.llm.layers[0].attn.q_proj.weight)  # the rest learned
    # the trained checkpoint's tower, written back out, is the tower it started from
    pretrain_tower.main(["--from-checkpoint", str(out), "--out", str(tmp_path / "back")])
    back = GeoChat(tiny_config())
    load_vision_tower(back, tmp_path / "back")
    for key, value in pretrained.vision.state_dict().items():
        assert torch.equal(back.vision.state_dict()[key], value), key
    assert json.loads((tmp_path / "back" / "pretrain_metrics.json").read_text()) == {"from_checkpoint": str(out)}


def test_a_tower_of_another_shape_is_refused_in_one_line(setup_dir, tower_dir, tmp_path, capsys):  # noqa: F811
    other = tiny_config()
    other.vision.width = 48
    with pytest.raises(ValueError, match="differs from the model's"):
        load_vision_tower(GeoChat(other), tower_dir)
    config = tmp_path / "other.json"
    config.write_text(json.dumps(other.to_dict()))
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(config), "--vision-tower", str(tower_dir), "--tokenizer", str(setup_dir["tokenizer"]),
                    "--data", str(setup_dir["data"]), "--image-folder", str(setup_dir["images"]), "--out", str(tmp_path / "o"),
                    "--device", "cpu", "--mode", "full", "--max-steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from the model's" in err[0]
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(config), "--vision-tower", str(tmp_path), "--tokenizer", str(setup_dir["tokenizer"]),
                    "--data", str(setup_dir["data"]), "--image-folder", str(setup_dir["images"]), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "not a CLIP directory" in capsys.readouterr().err


def test_tower_schedules_share_the_warmup_then_hold_or_decay_to_zero():
    steps, peak = 200, 1e-3
    constant = [pretrain_tower.tower_lr(s, steps, peak, "constant") for s in range(steps)]
    cosine = [pretrain_tower.tower_lr(s, steps, peak, "cosine") for s in range(steps)]
    warmup = steps // 20
    assert constant[:warmup] == pytest.approx(cosine[:warmup]) and constant[0] == pytest.approx(peak / warmup)
    assert constant[warmup - 1:] == [peak] * (steps - warmup + 1)  # the shipped tower's schedule, unchanged
    assert cosine[warmup - 1] == pytest.approx(peak)
    assert all(a >= b for a, b in zip(cosine[warmup - 1:], cosine[warmup:]))  # falls and never rises again
    assert cosine[steps // 2 + warmup // 2] == pytest.approx(peak / 2, rel=0.02) and 0 < cosine[-1] < peak / 1000


def test_cosine_tower_trains_and_records_its_schedule(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    pretrain_tower.main(["--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "clip"), "--n-train", "8",
                         "--n-test", "4", "--steps", "3", "--batch-size", "4", "--schedule", "cosine"])
    metrics = json.loads((tmp_path / "clip" / "pretrain_metrics.json").read_text())
    assert metrics["schedule"] == "cosine" and metrics["steps"] == 3 and (tmp_path / "clip" / "model.safetensors").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--object-scale", "9"], "--object-scale must be in"),
    (["--count-weight", "-1"], "--count-weight must be >= 0"),
    (["--angle-weight", "-1"], "--angle-weight must be >= 0"),
    (["--axis-weight", "-1"], "--axis-weight must be >= 0"),
    (["--config", "nope"], "neither a known config"),
])
def test_pretrain_tower_refuses_bad_input(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        pretrain_tower.main(["--out", str(tmp_path / "t"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_tower_from_a_missing_checkpoint_is_one_line_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pretrain_tower.main(["--from-checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "t")])
    assert e.value.code == 2 and not (tmp_path / "t").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "not found" in err[0]


def test_reading_experiment_runs_its_pretrained_and_symbolic_rows(tmp_path):
    """scripts/reading_experiment.py at a tiny size: the rows that pretrain a tower (through pretrain_tower's head
    and loss) and the symbolic row each give a held-out accuracy at step 50."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import reading_experiment

    out = tmp_path / "curves.json"
    reading_experiment.main(["--variants", "pretrained-frozen,symbolic", "--steps", "50", "--pretrain-steps", "2",
                             "--n-train", "16", "--n-test", "8", "--batch-size", "4", "--json", str(out)])
    curves = json.loads(out.read_text())
    assert set(curves) == {"pretrained-frozen", "symbolic"}
    assert all(len(c) == 1 and c[0][0] == 50 and 0.0 <= c[0][1] <= 1.0 for c in curves.values())
