"""Tests for eval.py (GeoChat-Bench scoring)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import eval as ev  # noqa: E402


def rect(x1, y1, x2, y2):
    return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]


# ----------------------------------------------------------------- box fields


def _iou1(a, b):
    pa, pb = ev.boxes_from_field(a), ev.boxes_from_field(b)
    assert len(pa) == 1 and len(pb) == 1
    return ev.polygon_iou(pa[0], pb[0])


def test_boxes_from_field_formats():
    sq = rect(10, 20, 30, 40)
    one = ev.boxes_from_field("{<10><20><30><40>|<0>}")
    assert len(one) == 1 and ev.polygon_iou(one[0], sq) == pytest.approx(1.0)
    assert _iou1("{<10><20><30><40>}", [10, 20, 30, 40]) == pytest.approx(1.0)
    assert _iou1([10, 20, 30, 40, 0], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert _iou1([10, 20, 30, 20, 30, 40, 10, 40], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert _iou1([[10, 20], [30, 20], [30, 40], [10, 40]], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert _iou1("[10, 20, 30, 40]", "{<10><20><30><40>|<0>}") == pytest.approx(1.0)
    assert _iou1(["10", "20", "30", "40"], [10, 20, 30, 40]) == pytest.approx(1.0)
    # several boxes, labelled grounding answer
    two = ev.boxes_from_field("<p>two planes</p> {<8><82><16><90>|<69>}{<6><44><14><48>|<32>}")
    assert len(two) == 2
    assert len(ev.boxes_from_field([[1, 2, 3, 4], [5, 6, 7, 8, 10]])) == 2
    assert len(ev.boxes_from_field([[[0, 0], [1, 0], [1, 1], [0, 1]],
                                    [[2, 2], [3, 2], [3, 3], [2, 3]]])) == 2
    assert len(ev.boxes_from_field("boxes [1, 2, 3, 4] and (5, 6, 7, 8)")) == 2


def test_boxes_from_field_malformed():
    assert ev.boxes_from_field(None) == []
    assert ev.boxes_from_field("") == []
    assert ev.boxes_from_field("I cannot find it.") == []
    assert ev.boxes_from_field("[1, 2, 3]") == []  # wrong number count
    assert ev.boxes_from_field([1, 2, "x", 4]) == []
    assert ev.boxes_from_field([1, 2, float("nan"), 4]) == []
    assert ev.boxes_from_field([1, 2, 3, 4, 5, 6]) == []
    assert ev.boxes_from_field({"x": 1}) == []
    assert ev.boxes_from_field([True, 2, 3, 4]) == []
    # a valid box next to junk survives
    assert len(ev.boxes_from_field([[1, 2, 3], [10, 20, 30, 40]])) == 1


def test_box_normalisation_angles_and_reversed_corners():
    ref = "{<10><20><50><40>|<30>}"
    assert _iou1("{<50><40><10><20>|<30>}", ref) == pytest.approx(1.0)  # reversed corners
    assert _iou1([50, 20, 10, 40, 30], ref) == pytest.approx(1.0)
    assert _iou1([10, 20, 50, 40, 390], ref) == pytest.approx(1.0)  # 390 = 30 mod 360
    assert _iou1([10, 20, 50, 40, -330], ref) == pytest.approx(1.0)
    assert _iou1("{<10><20><50><40>|<390>}", ref) == pytest.approx(1.0)
    # a rotated box differs from the axis-aligned one, and 180 degrees is the same rectangle
    assert _iou1([10, 20, 50, 40, 30], [10, 20, 50, 40]) < 0.99
    assert _iou1([10, 20, 50, 40, 180], [10, 20, 50, 40]) == pytest.approx(1.0)
    # a square rotated by 90 is itself
    assert _iou1([10, 10, 30, 30, 90], [10, 10, 30, 30]) == pytest.approx(1.0)
    # rotation is about the centre: the 90-degree rotated 40x20 box is 20x40 at the same centre
    assert _iou1([10, 20, 50, 40, 90], [20, 10, 40, 50]) == pytest.approx(1.0)
    # zero-area predicted box never matches
    assert _iou1([10, 20, 10, 40], [10, 20, 30, 40]) == 0.0


# ----------------------------------------------------------------- matching rule


A, B = [0, 0, 10, 10], [50, 50, 60, 60]
NEAR_A, NEAR_B = [1, 0, 11, 10], [50, 51, 60, 61]


def _correct(pred, gt):
    ok, _ = ev.match_boxes(ev.boxes_from_field(pred), ev.boxes_from_field(gt))
    return ok


def test_matching_rule():
    assert _correct([NEAR_A, NEAR_B], [A, B])
    assert _correct([NEAR_B, NEAR_A], [A, B])  # swapped order
    assert not _correct([NEAR_A, [80, 80, 90, 90]], [A, B])  # one wrong
    assert not _correct([NEAR_A, NEAR_B, [80, 80, 90, 90]], [A, B])  # extra prediction
    assert not _correct([NEAR_A, NEAR_B, NEAR_B], [A, B])  # duplicate extra
    assert not _correct([NEAR_A], [A, B])  # missing one
    assert not _correct([NEAR_A, NEAR_A], [A, B])  # both on the same object
    assert not _correct([], [A])
    assert _correct([NEAR_A], [A])
    assert not _correct([[4, 0, 14, 10]], [A])  # IoU 6/14 < 0.5
    assert _correct([[0, 0, 10, 5]], [A])  # IoU exactly 0.5 counts


def test_matching_is_exact_not_greedy():
    # greedy-by-best-IoU pairs P1 with GA (0.818) and leaves P2 without a partner;
    # the exact matching pairs P1-GB (0.667) and P2-GA (0.538).
    ga, gb = [0, 0, 10, 10], [3, 0, 13, 10]
    p1, p2 = [1, 0, 11, 10], [-3, 0, 7, 10]
    assert _correct([p1, p2], [ga, gb])
    assert _correct([p2, p1], [gb, ga])


# ----------------------------------------------------------------- referring scorer


def test_score_referring():
    rows = [
        # 1 correct single small (pixel GT of a SOTA 1024 image -> grid /10.24)
        {"question_id": 1, "answer": "{<10><10><20><20>|<0>}", "type": "ref", "size_group": "small",
         "dataset": "SOTA", "ground_truth": [[[102.4, 102.4], [204.8, 102.4], [204.8, 204.8], [102.4, 204.8]]],
         "obj_ids": [5]},
        # 2 wrong single small: box elsewhere
        {"question_id": 2, "answer": "{<60><60><70><70>|<0>}", "type": "ref", "size_group": "small",
         "ground_truth": [[10, 10, 20, 20]]},
        # 3 correct multi large grounding, predictions swapped, labelled
        {"question_id": 3, "answer": "<p>planes</p> {<51><50><61><60>|<0>}{<0><0><10><10>|<0>}",
         "type": "grounding", "size_group": "large",
         "ground_truth": "{<0><0><10><10>|<0>}{<50><50><60><60>|<0>}"},
        # 4 failed generation (None) single medium
        {"question_id": 4, "answer": None, "type": "ref", "size_group": "medium",
         "ground_truth": [[10, 10, 20, 20]]},
        # 5 garbage answer single medium
        {"question_id": 5, "answer": "<3><x>{<1>", "type": "ref", "size_group": "medium",
         "ground_truth": [10, 10, 20, 20]},
        # 6 multi with one prediction only
        {"question_id": 6, "answer": "{<0><0><10><10>}", "type": "grounding", "size_group": "large",
         "ground_truth": [[0, 0, 10, 10], [50, 50, 60, 60]]},
        # 7 no ground truth -> skipped
        {"question_id": 7, "answer": "{<0><0><10><10>}", "ground_truth": None},
    ]
    m = ev.score_referring(rows)
    assert m["n"] == 6 and m["correct"] == 2 and m["failed"] == 1 and m["no_gt"] == 1
    assert m["acc@0.5"] == pytest.approx(2 / 6)
    assert m["by_size_group"]["small"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert m["by_size_group"]["medium"]["accuracy"] == 0.0
    assert m["by_size_group"]["large"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert m["by_object_count"]["single"] == {"n": 4, "correct": 1, "accuracy": 0.25}
    assert m["by_object_count"]["multi"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert m["by_type"]["ref"]["accuracy"] == 0.25
    assert m["by_type"]["grounding"]["accuracy"] == 0.5
    # single-object IoUs: 1.0, 0.0, 0.0 (failed), 0.0 (no box)
    assert m["mean_iou_single"] == pytest.approx(0.25)
    json.dumps(m)  # serialisable


def test_gt_scaling_and_override():
    row = {"answer": "{<10><10><20><20>}", "ground_truth": [[60, 60, 120, 120]], "dataset": "FAST"}
    assert ev.score_referring([row])["correct"] == 1  # 600 px -> /6
    row2 = dict(row, dataset="other")
    assert ev.score_referring([row2])["correct"] == 0
    assert ev.score_referring([row2], gt_size=600)["correct"] == 1
    # non-square image padded to a square: 200x100 -> side 200, y offset 50
    row3 = {"answer": "{<10><30><20><40>}", "ground_truth": [[20, 10, 40, 30]], "image_size": [200, 100]}
    assert ev.score_referring([row3])["correct"] == 1


# ----------------------------------------------------------------- scene / vqa


def test_score_scene():
    rows = [
        {"question_id": "agricultural/agricultural_01.tif", "answer": "Agricultural", "ground_truth": "agricultural"},
        {"question_id": "denseresidential/dr_01.tif", "answer": "Dense residential.", "ground_truth": "dense residential"},
        {"question_id": "denseresidential/dr_02.tif", "answer": "medium residential", "ground_truth": "dense residential"},
        {"question_id": "airplane/a.tif", "answer": None},
        {"question_id": "17", "answer": "Bare Land", "ground_truth": "BareLand"},
    ]
    m = ev.score_scene(rows)
    assert (m["n"], m["correct"], m["failed"]) == (5, 3, 1)
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["per_class"]["denseresidential"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert m["per_class"]["airplane"]["accuracy"] == 0.0
    assert m["per_class"]["bareland"]["accuracy"] == 1.0


def test_score_vqa():
    rows = [
        {"question_id": 1, "answer": "Yes.", "category": "presence"},
        {"question_id": 2, "answer": "no", "category": "presence"},
        {"question_id": 3, "answer": "yes", "category": "comp"},
        {"question_id": 4, "answer": " Rural ", "category": "rural_urban"},
        {"question_id": 5, "answer": "12", "category": "count"},
        {"question_id": 6, "answer": None, "category": "comp"},
        {"question_id": 7, "answer": "yes", "category": "presence"},  # no ground truth anywhere
        {"question_id": 8, "answer": "no", "type": "comp", "ground_truth": "no"},  # own gt, 'type'
    ]
    gt = [{"id": 100, "question_id": 1, "answer": "yes"}, {"id": 101, "question_id": 2, "answer": "yes"},
          {"id": 102, "question_id": 3, "answer": "yes"}, {"id": 103, "question_id": 4, "answer": "rural"},
          {"id": 104, "question_id": 5, "answer": "12"}, {"id": 105, "question_id": 6, "answer": "no"}]
    m = ev.score_vqa(rows, gt)
    assert m["excluded_count"] == 1 and m["missing_gt"] == 1 and m["failed"] == 1
    assert (m["n"], m["correct"]) == (6, 4)
    assert m["per_category"]["presence"]["accuracy"] == 0.5
    assert m["per_category"]["comp"]["accuracy"] == pytest.approx(2 / 3)
    assert m["per_category"]["rural_urban"]["accuracy"] == 1.0
    assert "count" not in m["per_category"]
    assert m["average"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    m2 = ev.score_vqa(rows, gt, include_count=True)
    assert m2["per_category"]["count"]["accuracy"] == 1.0 and m2["n"] == 7
    assert m2["average"] == pytest.approx((0.5 + 2 / 3 + 1.0 + 1.0) / 4)


# ----------------------------------------------------------------- captions


def test_rouge_hand_worked():
    # hyp 4 tokens, ref 6 tokens, overlap {a, white, plane} = 3: P .75 R .5 F .6 ; LCS also 3
    h, r = "A small white plane.", "a white plane on the runway"
    assert ev.rouge_n(h, r, 1) == pytest.approx(0.6)
    assert ev.rouge_l(h, r) == pytest.approx(0.6)
    # same bag of words in reverse order: ROUGE-1 = 1, LCS = 1 -> 1/3
    assert ev.rouge_n("plane white a", "a white plane") == pytest.approx(1.0)
    assert ev.rouge_l("plane white a", "a white plane") == pytest.approx(1 / 3)
    # clipped counts: hyp 'the the the', ref 'the cat': overlap 1, P 1/3 R 1/2 -> F 0.4
    assert ev.rouge_n("the the the", "the cat") == pytest.approx(0.4)
    assert ev.rouge_n("", "the cat") == 0.0
    assert ev.rouge_n("dog", "the cat") == 0.0
    assert ev.rouge_n("a b c", "a b d", 2) == pytest.approx(0.5)
    # tags, box strings and punctuation are not tokens
    assert ev.tokenize("<p>Small-Vehicle</p> {<1><2><3><4>|<5>}.") == ["small", "vehicle"]


def test_meteor_hand_worked():
    # identical 6 words: fmean 1, 1 chunk / 6 matches -> penalty 0.5/216
    assert ev.meteor("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1 - 0.5 / 216)
    # 'a b c d' vs 'c d a b': 4 matches, 2 chunks -> penalty 0.5*(1/2)^3
    assert ev.meteor("a b c d", "c d a b") == pytest.approx(0.9375)
    # P 2/3, R 1/2: fmean = (1/3) / (0.6 + 0.05); 1 chunk of 2 -> penalty 0.0625
    assert ev.meteor("large white plane", "a white plane parked") == pytest.approx(0.9375 * (1 / 3) / 0.65)
    # repeated hypothesis word matches once: P 1/2 R 1 -> fmean 0.5/0.55; penalty 0.5
    assert ev.meteor("the the", "the") == pytest.approx(0.5 * 0.5 / 0.55)
    assert ev.meteor("dog", "cat") == 0.0
    assert ev.meteor("", "cat") == 0.0


def test_score_region_caption():
    rows = [
        {"question_id": 1, "answer": "a white plane", "ground_truth": "a white plane"},
        {"question_id": 2, "answer": "plane white a", "ground_truth": "a white plane"},
        {"question_id": 3, "answer": None, "ground_truth": "a ship"},
        {"question_id": 4, "answer": "x", "ground_truth": None},
    ]
    m = ev.score_region_caption(rows)
    assert (m["n"], m["failed"], m["missing_gt"]) == (3, 1, 1)
    assert m["rouge1"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["rougeL"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    # sample 1: 3 matches 1 chunk -> 1 - 0.5/27 ; sample 2: 3 chunks -> 1 - 0.5
    assert m["meteor"] == pytest.approx(((1 - 0.5 / 27) + 0.5 + 0) / 3)


def test_format_table_and_run_with_a_missing_question_file(tmp_path, capsys):
    m = ev.score_scene([{"question_id": "a/1", "answer": "a"}])
    t = ev.format_table(m)
    assert "accuracy" in t and "per_class" in t
    missing = tmp_path / "q.jsonl"
    code = ev.main(["run", "--bench", "scene", "--questions", str(missing), "--image-folder", "img",
                    "--checkpoint", "ck", "--answers", str(tmp_path / "a.jsonl"), "--batch-size", "2", "--limit", "3",
                    "--device", "cpu", "--dtype", "float32"])
    assert code == 2 and str(missing) in capsys.readouterr().err


# ----------------------------------------------------------------- CLI


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "score", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cli_score_vqa_and_bad_json(tmp_path):
    ans = _write_jsonl(tmp_path / "ans.jsonl", [
        {"question_id": 1, "image_id": "1.tif", "answer": "yes"},
        {"question_id": 2, "image_id": "2.tif", "answer": "no"},
        {"question_id": 3, "image_id": "3.tif", "answer": "4"},
    ])
    questions = _write_jsonl(tmp_path / "lrben.jsonl", [
        {"question_id": 1, "image": "1.tif", "text": "q", "category": "presence"},
        {"question_id": 2, "image": "2.tif", "text": "q", "category": "comp"},
        {"question_id": 3, "image": "3.tif", "text": "q", "category": "count"},
    ])
    gt = tmp_path / "answers.json"
    gt.write_text(json.dumps({"answers": [{"id": 9, "question_id": 1, "answer": "yes", "active": True},
                                          {"id": 8, "question_id": 2, "answer": "yes", "active": True},
                                          {"id": 7, "question_id": 3, "answer": "4", "active": True}]}))
    p = _cli("--bench", "vqa", "--answers", ans, "--questions", questions, "--gt", str(gt))
    assert p.returncode == 0, p.stderr
    m = json.loads(p.stdout.strip().splitlines()[-1])
    assert m["accuracy"] == 0.5 and m["average"] == 0.5 and m["excluded_count"] == 1
    assert "presence" in p.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "answer": "a"}\n{not json\n')
    p = _cli("--bench", "scene", "--answers", str(bad))
    assert p.returncode == 2
    assert f"{bad}:2: not valid JSON" in p.stderr



def test_cli_unknown_bench_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["score", "--bench", "nope", "--answers", "x.jsonl"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_cli_score_referring(tmp_path):
    ans = _write_jsonl(tmp_path / "ref.jsonl", [
        {"question_id": "q1", "image_id": "P0001", "answer": "{<10><10><20><20>|<0>}",
         "ground_truth": [[[102.4, 102.4], [204.8, 102.4], [204.8, 204.8], [102.4, 204.8]]],
         "question": "the plane", "type": "ref", "dataset": "SOTA", "obj_ids": [1], "size_group": "small"},
        {"question_id": "q2", "image_id": "P0002", "answer": "nothing",
         "ground_truth": [[[0, 0], [60, 0], [60, 60], [0, 60]]],
         "question": "the ship", "type": "ref", "dataset": "FAST", "obj_ids": [2], "size_group": "large"},
    ])
    p = _cli("--bench", "referring", "--answers", ans)
    assert p.returncode == 0, p.stderr
    m = json.loads(p.stdout.strip().splitlines()[-1])
    assert m["bench"] == "referring" and m["acc@0.5"] == 0.5
    assert m["by_size_group"]["small"]["accuracy"] == 1.0


def test_cli_score_refuses_answers_of_another_bench_and_bad_files(tmp_path):
    ans = _write_jsonl(tmp_path / "scene.jsonl", [{"question_id": "a/1", "answer": "a", "ground_truth": "a", "bench": "scene"}])
    p = _cli("--bench", "vqa", "--answers", ans)
    assert p.returncode == 2 and "holds answers of bench scene, not vqa" in p.stderr
    binary = tmp_path / "answers.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    p = _cli("--bench", "scene", "--answers", str(binary))
    assert p.returncode == 2 and f"{binary}: not a text file" in p.stderr and "Traceback" not in p.stderr
    p = _cli("--bench", "referring", "--answers", ans, "--gt-size", "0")
    assert p.returncode == 2 and "--gt-size must be a positive number" in p.stderr


def test_score_runs_without_torch(tmp_path):
    # `eval.py score` is pure Python: answer files of the original GeoChat can be scored on any machine.
    ans = _write_jsonl(tmp_path / "ucm.jsonl", [{"question_id": "forest/1.tif", "answer": "Forest."},
                                                {"question_id": "river/2.tif", "answer": "beach"}])
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nfor name in ('torch', 'numpy', 'PIL', 'sentencepiece'):\n    sys.modules[name] = None\n")
    env = dict(os.environ, PYTHONPATH=str(blocker))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "score", "--bench", "scene", "--answers", ans],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["accuracy"] == 0.5
    p = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert p.returncode != 0  # the blocker really blocks
