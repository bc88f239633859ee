import io
import json
import math
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic.prepare import main as prepare_main, write_dataset  # noqa: E402
from synthetic.scenes import (  # noqa: E402
    ASK_ORDER, GRID_CELLS, GROUNDING_PROMPT, OBJECT_CLASSES, PLURALS, SCENE_CLASSES, TASKS, grid_answer,
    instruct_records, make_scene, question_answer,
)

BOX_RE = re.compile(r"\{<(\d+)><(\d+)><(\d+)><(\d+)>\|<(\d+)>\}")
SCENE_PROMPT = ("Classify the given image in one of the following classes. Classes: farmland, water, desert, urban. \n"
                "Answer in one word or a short phrase.")
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."


# The opening words of each synthetic task's question (the scene question is matched whole).
QUESTION_PREFIXES = [("[grounding] ", "grounding"), ("[refer] Give me the location of <p> ", "refer"),
                     ("[grounding]all ", "refer"),  # several objects: the referring bench's wording
                     ("[identify] What is the object present at {", "identify"), ("Is there a", "presence"),
                     ("How many", "count"), ("Are there more", "comparison")]


def turn_task(question):
    """The synthetic task of a turn's question (QUESTION_PREFIXES; the scene question matched whole), None if none."""
    if question == SCENE_PROMPT:
        return "scene"
    return next((t for prefix, t in QUESTION_PREFIXES if question.startswith(prefix)), None)


def parse_boxes(text):
    return [tuple(int(v) for v in m.groups()) for m in BOX_RE.finditer(text)]


def inside_box(box, xs, ys, size, tol_px=1.0):
    """Whether pixel centres (xs+0.5, ys+0.5) lie in the box rotated CCW on screen by θ (y down)."""
    x1, y1, x2, y2, th = box
    s = size / 100.0
    cx, cy, hw, hh = (x1 + x2) / 2 * s, (y1 + y2) / 2 * s, (x2 - x1) / 2 * s, (y2 - y1) / 2 * s
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    c, sn = math.cos(math.radians(th)), math.sin(math.radians(th))
    u = dx * c - dy * sn          # inverse of x = cx + u c + v s, y = cy - u s + v c
    v = dx * sn + dy * c
    return (np.abs(u) <= hw + tol_px) & (np.abs(v) <= hh + tol_px)


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def test_determinism():
    for seed in (0, 7, 123456):
        a_img, a_ann = make_scene(seed)
        b_img, b_ann = make_scene(seed)
        assert png_bytes(a_img) == png_bytes(b_img)
        assert a_ann == b_ann
        assert a_img.size == (128, 128) and a_img.mode == "RGB"
    assert png_bytes(make_scene(1)[0]) != png_bytes(make_scene(2)[0])
    assert make_scene(3, size=64)[0].size == (64, 64)


def test_box_convention_direction():
    # a long thin box at 90 deg: its long side (w) must point up/down on screen
    box = (40, 48, 60, 52, 90)
    ys, xs = np.mgrid[0:100, 0:100]
    m = inside_box(box, xs, ys, 100, tol_px=0)
    assert m[40:60, 50].all() and not m[50, 40:45].any()
    # at 30 deg CCW on screen (y down) the right end of the long axis moves UP
    box = (30, 48, 70, 52, 30)
    m = inside_box(box, xs, ys, 100, tol_px=0)
    end_x, end_y = 50 + 20 * math.cos(math.radians(30)), 50 - 20 * math.sin(math.radians(30))
    assert m[int(end_y) + 1, int(end_x) - 1]
    assert not m[int(50 + 20 * math.sin(math.radians(30))), int(end_x) - 1]


def test_objects_inside_polygons_and_colours_present():
    n_obj = 0
    for seed in range(120):
        img, ann = make_scene(seed)
        bg, ann2 = make_scene(seed, draw_objects=False)
        assert ann == ann2
        a, b = np.asarray(img), np.asarray(bg)
        diff = np.any(a != b, axis=-1)
        ys, xs = np.nonzero(diff)
        union = np.zeros(len(xs), bool)
        for o in ann["objects"]:
            n_obj += 1
            (box,) = parse_boxes(o["box"])
            assert list(box) == o["grid"]
            inside = inside_box(box, xs, ys, ann["size"], tol_px=1e-6)  # exact raster
            union |= inside
            # the object was drawn: enough changed pixels in its box
            x1, y1, x2, y2, _ = box
            area_px = (x2 - x1) * (y2 - y1) * (ann["size"] / 100) ** 2
            assert inside.sum() >= 0.25 * area_px, (seed, o)
            # its main colour is present inside its polygon
            gy, gx = np.mgrid[0:ann["size"], 0:ann["size"]]
            poly = inside_box(box, gx, gy, ann["size"], tol_px=0.5)
            col = np.all(a == np.array(o["color"], np.uint8), axis=-1)
            assert (col & poly).sum() >= 0.1 * area_px, (seed, o)
            # rbox agrees with the grid box
            cx, cy, w, h, th = o["rbox"]
            s = ann["size"] / 100
            assert (cx, cy, w, h, th) == pytest.approx(((x1 + x2) / 2 * s, (y1 + y2) / 2 * s,
                                                         (x2 - x1) * s, (y2 - y1) * s, box[4]))
        assert union.all(), (seed, "object pixels outside every polygon")
    assert n_obj > 150


def test_scene_consistency_and_layout():
    scenes, classes = set(), set()
    for seed in range(300):
        _, ann = make_scene(seed)
        scenes.add(ann["scene"])
        assert ann["scene"] in SCENE_CLASSES
        assert len(ann["objects"]) <= 3
        for o in ann["objects"]:
            classes.add(o["class"])
            assert o["class"] in OBJECT_CLASSES
            assert (o["class"] == "ship") == (ann["scene"] == "water")
            x1, y1, x2, y2, th = o["grid"]
            assert 0 <= x1 < x2 <= 100 and 0 <= y1 < y2 <= 100 and 0 <= th < 90
            if o["class"] == "storage tank":
                assert th == 0 and x2 - x1 == y2 - y1
            # rotated corners inside the image
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            c, sn = math.cos(math.radians(th)), math.sin(math.radians(th))
            for u, v in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
                u, v = u * (x2 - x1) / 2, v * (y2 - y1) / 2
                px, py = cx + u * c + v * sn, cy - u * sn + v * c
                assert -1e-6 <= px <= 100 + 1e-6 and -1e-6 <= py <= 100 + 1e-6
    assert scenes == set(SCENE_CLASSES)
    assert classes == set(OBJECT_CLASSES)


def _boxes_well_formed(text):
    stripped = BOX_RE.sub("", text)
    assert "{" not in stripped and "}" not in stripped, text
    for b in parse_boxes(text):
        assert all(0 <= v <= 100 for v in b[:4]) and 0 <= b[4] < 90


def test_vqa_balance_and_counts():
    import random
    answers = {"presence": [], "comparison": []}
    for seed in range(200):
        _, ann = make_scene(seed)
        counts = {c: sum(o["class"] == c for o in ann["objects"]) for c in OBJECT_CLASSES}
        rng = random.Random(10**6 + seed)  # not the scene seed: avoid correlated streams
        for task in ("presence", "count", "comparison"):
            if task == "comparison" and not ann["objects"]:
                continue
            q, a = question_answer(ann, task, rng)
            assert q.endswith(VQA_SUFFIX)
            if task == "presence":
                cls = re.match(r"Is there a (.+) in the image\?", q).group(1)
                assert a == ("Yes" if counts[cls] else "No")
            elif task == "count":
                plural = re.match(r"How many (.+) are there in the image\?", q).group(1)
                cls = [c for c in OBJECT_CLASSES if c + "s" == plural][0]
                assert a == str(counts[cls])
            else:
                pa, pb = re.match(r"Are there more (.+) than (.+)\?", q).groups()
                ca = [c for c in OBJECT_CLASSES if c + "s" == pa][0]
                cb = [c for c in OBJECT_CLASSES if c + "s" == pb][0]
                assert a == ("Yes" if counts[ca] > counts[cb] else "No")
            if task in answers:
                answers[task].append(a == "Yes")
    for task, v in answers.items():
        frac = sum(v) / len(v)
        assert 0.4 <= frac <= 0.6, (task, frac)


def test_conversations_format_and_tasks():
    seen = set()
    for seed in range(40):
        _, ann = make_scene(seed)
        recs = instruct_records(ann, "img_%d.png" % seed, n_records=7, multi_turn_prob=0.3)
        assert len(recs) == 7
        for r in recs:
            conv = r["conversations"]
            assert r["image"] == "img_%d.png" % seed and isinstance(r["id"], str)
            assert len(conv) % 2 == 0 and 2 <= len(conv) <= 6
            for k, t in enumerate(conv):
                assert t["from"] == ("human" if k % 2 == 0 else "gpt")
                assert t["value"].startswith("<image>\n") == (k == 0)
                _boxes_well_formed(t["value"])
            for h in conv[0::2]:
                q = h["value"].replace("<image>\n", "")
                task = turn_task(q)
                assert task is not None, q
                seen.add(task)
    assert seen == set(TASKS)


def test_turns_set_the_questions_of_multi_turn_records():
    """turns=(lo, hi): every multi-turn record asks lo..hi questions (the default (2, 3)), each one once; with
    refuse_given_away a grounded description, which gives every answer away, is a record of its own."""
    _, ann = make_scene(3)
    default = instruct_records(ann, "img_3.png", n_records=40, multi_turn_prob=1.0)
    assert {len(r["conversations"]) // 2 for r in default} == {2, 3}
    assert default == instruct_records(ann, "img_3.png", n_records=40, multi_turn_prob=1.0, turns=(2, 3))
    more = instruct_records(ann, "img_3.png", n_records=40, multi_turn_prob=1.0, turns=(3, 5))
    assert {len(r["conversations"]) // 2 for r in more} == {3, 4, 5}
    single = instruct_records(ann, "img_3.png", n_records=10, multi_turn_prob=0.0, turns=(3, 5))
    assert {len(r["conversations"]) for r in single} == {2}
    strict = instruct_records(ann, "img_3.png", n_records=40, multi_turn_prob=1.0, turns=(3, 5), refuse_given_away=True)

    def described(record):
        return any("[grounding] Describe" in turn["value"] for turn in record["conversations"])

    assert {len(r["conversations"]) // 2 for r in strict if not described(r)} == {3, 4, 5}
    assert any(described(r) for r in strict) and all(len(r["conversations"]) == 2 for r in strict if described(r))


def test_refuse_given_away_asks_a_description_first_whatever_it_holds():
    """refuse_given_away: a grounded description is always its record's first question, as sample.py and the bench ask
    it, for scenes with objects and without. Placed wherever nothing was given away, a description of objects came only
    after comparisons (which state no object fact), so the first turn's description was "no notable objects" in 834 of
    840 cases and a baby trained on such records answered that for every scene (the README's attempts table)."""
    tasks = ("presence", "presence", "count", "refer", "comparison", "grounding", "identify", "scene")
    first = {True: 0, False: 0}
    for seed in range(80):
        _, ann = make_scene(seed)
        for r in instruct_records(ann, "img.png", n_records=6, multi_turn_prob=1.0, turns=(3, 5), tasks=tasks,
                                  refuse_given_away=True, refer_every_class=True):
            humans = [t["value"] for t in r["conversations"][0::2]]
            places = [i for i, q in enumerate(humans) if "[grounding] Describe" in q]
            assert places in ([], [0]), humans
            if places:
                first["{<" in r["conversations"][1]["value"]] += 1
    assert first[True] > 20 and first[False] > 0, first


SINGULAR = {plural: cls for cls, plural in PLURALS.items()}


def given_away(question, answer, ann):
    """What one turn tells, read off its text alone (independently of the generator): a set of facts."""
    boxes = {o["box"]: i for i, o in enumerate(ann["objects"])}
    if question.startswith("[grounding] Describe"):
        return {("scene",)} | {(k, c) for c in OBJECT_CLASSES for k in ("presence", "count")} | {
            (k, i) for i in range(len(ann["objects"])) for k in ("box", "class")}
    m = re.match(r"\[refer\] Give me the location of <p> the (.+) </p>$", question) or re.match(
        r"\[grounding\]all (.+)$", question)
    if m:
        cls = SINGULAR.get(m.group(1), m.group(1))
        ids = [boxes[b] for b in re.findall(r"\{[^}]*\}", answer)]
        return {("presence", cls), ("count", cls)} | {(k, i) for i in ids for k in ("box", "class")}
    if question.startswith("[identify]"):
        i = boxes[re.search(r"\{[^}]*\}", question).group(0)]
        return {("box", i), ("class", i), ("presence", ann["objects"][i]["class"])}
    m = re.match(r"Is there a (.+) in the image\?", question)
    if m:
        return {("presence", m.group(1))} | ({("count", m.group(1))} if answer == "No" else set())
    m = re.match(r"How many (.+) are there in the image\?", question)
    if m:
        return {("count", SINGULAR[m.group(1)]), ("presence", SINGULAR[m.group(1)])}
    m = re.match(r"Are there more (.+) than (.+)\?", question)
    if m:
        return {("more", frozenset((SINGULAR[m.group(1)], SINGULAR[m.group(2)])))}
    assert question == SCENE_PROMPT, question
    return {("scene",)}


def answer_known(question, answer, ann, known):
    """Whether earlier turns (`known` facts) already gave this turn's answer away."""
    told = given_away(question, answer, ann)
    if question.startswith("[grounding] Describe"):
        return bool(told & known)
    if question.startswith(("[refer]", "[grounding]all")):
        return any(f in known for f in told if f[0] == "box")
    if question.startswith("[identify]"):
        return any(f in known for f in told if f[0] == "class")
    m = re.match(r"Are there more (.+) than (.+)\?", question)
    if m:
        a, b = SINGULAR[m.group(1)], SINGULAR[m.group(2)]
        return ("more", frozenset((a, b))) in known or {("count", a), ("count", b)} <= known
    if question.startswith("Is there a"):
        return any(f in known for f in told if f[0] == "presence")
    if question.startswith("How many"):
        return any(f in known for f in told if f[0] == "count")
    return ("scene",) in known


def test_a_record_never_asks_a_question_twice():
    """Multi-turn records draw again rather than repeat a question (whose answer an earlier turn would give away);
    a scene with too few distinct questions for the record's turns ends the record early."""
    long_records = 0
    for seed in range(30):
        _, ann = make_scene(seed)
        for r in instruct_records(ann, "img.png", n_records=6, multi_turn_prob=1.0, turns=(5, 8),
                                  tasks=("presence", "refer", "refer", "scene")):
            questions = [t["value"].replace("<image>\n", "") for t in r["conversations"][0::2]]
            assert len(questions) == len(set(questions)), questions
            long_records += len(questions) >= 5
    assert long_records > 100  # most records still get their turns: presence alone has five classes to ask about
    _, ann = make_scene(3)
    (record,) = instruct_records(ann, "img.png", n_records=1, multi_turn_prob=1.0, turns=(4, 4), tasks=("scene",))
    assert len(record["conversations"]) == 2  # one scene question exists: the record ends after it


def record_turns(record):
    """A record's (question without the <image> line, answer) pairs."""
    conv = record["conversations"]
    return [(h["value"].replace("<image>\n", ""), g["value"]) for h, g in zip(conv[0::2], conv[1::2])]


def test_refer_every_class_asks_each_class_of_a_several_class_scene(tmp_path):
    """refer_every_class: a record about a scene of several classes that asks a [refer] question asks it of every
    class, each with its own boxes, still giving nothing away; other scenes' records and the default are unchanged.
    prepare.py's --refer-every-class writes such records."""
    reading = ("presence", "presence", "count", "refer", "refer")
    several = full = 0
    for seed in range(40):
        _, ann = make_scene(seed)
        targets = {question_answer(ann, "refer", random.Random(k))  # every (prompt, boxes) pair of the scene
                   for k in range(200) if ann["objects"]}
        plain = instruct_records(ann, "img.png", 3, 0, 1.0, reading, (3, 5), True)
        assert plain == instruct_records(ann, "img.png", 3, 0, 1.0, reading, (3, 5), True, refer_every_class=False)
        records = [(strict, r) for strict in (True, False)
                   for r in instruct_records(ann, "img.png", 3, 0, 1.0, reading, (3, 5), strict, refer_every_class=True)]
        for strict, r in records:
            turns = record_turns(r)
            refers = {t for t in turns if t[0].startswith(("[refer]", "[grounding]")) and t[0] != GROUNDING_PROMPT}
            assert refers <= targets and len(turns) == len({q for q, _ in turns})
            known = set()
            for q, a in turns:
                assert not (strict and answer_known(q, a, ann, known)), (q, a, turns)
                known |= given_away(q, a, ann)
            if len(targets) > 1 and refers:
                several += strict
                assert refers == targets, (refers, targets)
        full += sum(len(targets) > 1 and set(record_turns(r)) >= targets for r in plain)
    assert several > 20 and full < several  # the default asks every class in fewer records: the flag changes them
    paths = prepare_main(["scenes", "--out", str(tmp_path / "ds"), "--n-train", "6", "--n-test", "0", "--seed", "1",
                          "--multi-turn-prob", "1.0", "--records-per-image", "3", "--turns", "3-5",
                          "--tasks", ",".join(reading), "--refuse-given-away", "--refer-every-class"])
    anns = [json.loads(line) for line in Path(paths["annotations"]).read_text().splitlines()]
    expected = [r for a in anns for r in instruct_records(a, a["image"], 3, 1, 1.0, reading, (3, 5), True, True)]
    assert json.loads(Path(paths["train"]).read_text()) == expected
    assert expected != [r for a in anns for r in instruct_records(a, a["image"], 3, 1, 1.0, reading, (3, 5), True)]


def test_kind_order_asks_presence_and_counts_before_refer(tmp_path):
    """kind_order: after its first question (the one drawn first, as the bench asks every kind first) a record asks
    in ASK_ORDER, presence first and [refer] last, still giving nothing away; so with refuse_given_away a "the
    plane" no longer refuses the "Is there a plane?" ("Yes") drawn after it: more "Yes" and more counts, the first
    turn's kinds and its presence answers as without the flag. prepare.py's --kind-order writes such records."""
    reading = ("presence", "presence", "count", "refer", "refer", "scene")
    asked = {flag: {"Yes": 0, "count": 0} for flag in (True, False)}
    first = {flag: [] for flag in (True, False)}
    for seed in range(60):
        _, ann = make_scene(seed)
        assert instruct_records(ann, "img.png", 3, 0, 1.0, reading, (3, 5), True, True) == \
            instruct_records(ann, "img.png", 3, 0, 1.0, reading, (3, 5), True, True, kind_order=False)
        for flag in (True, False):
            for r in instruct_records(ann, "img.png", 3, 0, 1.0, reading, (3, 5), True, True, kind_order=flag):
                turns = record_turns(r)
                tasks = [turn_task(q) for q, _ in turns]
                ranks = [ASK_ORDER.index(t) for t in tasks[1:]]
                assert not flag or ranks == sorted(ranks), tasks
                known = set()
                for q, a in turns:
                    assert not answer_known(q, a, ann, known), (q, a, turns)
                    known |= given_away(q, a, ann)
                asked[flag]["Yes"] += sum(t == "presence" and a == "Yes" for t, (_, a) in zip(tasks, turns))
                asked[flag]["count"] += tasks.count("count")
                first[flag].append((tasks[0], turns[0][1] if tasks[0] == "presence" else None))
    assert asked[True]["Yes"] > 1.2 * asked[False]["Yes"] and asked[True]["count"] > asked[False]["count"], asked
    for flag in (True, False):
        kinds = [t for t, _ in first[flag]]
        yes = [a == "Yes" for t, a in first[flag] if t == "presence"]
        assert 0.35 <= sum(yes) / len(yes) <= 0.65 and 0.2 <= kinds.count("refer") / len(kinds) <= 0.5, (flag, kinds)
    args = ["scenes", "--n-train", "4", "--n-test", "0", "--seed", "2", "--multi-turn-prob", "1.0",
            "--records-per-image", "3", "--turns", "3-5", "--tasks", ",".join(reading), "--refuse-given-away"]
    paths = prepare_main(args + ["--out", str(tmp_path / "ds"), "--kind-order"])
    anns = [json.loads(line) for line in Path(paths["annotations"]).read_text().splitlines()]
    expected = [r for a in anns for r in instruct_records(a, a["image"], 3, 2, 1.0, reading, (3, 5), True,
                                                         kind_order=True)]
    assert json.loads(Path(paths["train"]).read_text()) == expected


def test_refuse_given_away_asks_nothing_an_earlier_turn_gave_away():
    """refuse_given_away: no question whose answer an earlier turn gave away (a count after "the plane", presence
    after a count, identify after a description), checked against the turns' text alone; records still get their
    turns, and the first turn's presence answer, the one the bench asks, stays as balanced as without the flag
    (inserting questions wherever nothing was given away made it "Yes" in 66% of a reading stage's records).
    Without it such turns occur (the checker finds them)."""
    long_records = leaks_default = 0
    first_yes = {True: [], False: []}
    tasks = ("presence", "presence", "count", "refer", "refer", "comparison", "grounding", "identify", "scene")
    for seed in range(60):
        _, ann = make_scene(seed)
        for strict in (True, False):
            for r in instruct_records(ann, "img.png", n_records=6, multi_turn_prob=1.0, turns=(5, 8), tasks=tasks,
                                      refuse_given_away=strict):
                turns = record_turns(r)
                known = set()
                for q, a in turns:
                    leak = answer_known(q, a, ann, known)
                    assert not (strict and leak), (q, a, turns)
                    leaks_default += leak
                    known |= given_away(q, a, ann)
                if turns[0][0].startswith("Is there"):
                    first_yes[strict].append(turns[0][1] == "Yes")
                long_records += strict and len(turns) >= 5
    assert long_records > 150 and leaks_default > 100
    share = {strict: sum(yes) / len(yes) for strict, yes in first_yes.items()}
    assert 0.4 <= share[True] <= 0.6 and abs(share[True] - share[False]) < 0.08, share
    _, ann = make_scene(3)  # the checker itself: a count after "all ships" gives 2 away
    refer = question_answer(ann, "refer", __import__("random").Random(0))
    count = ("How many ships are there in the image?", "2")
    assert answer_known(*count, ann, given_away(*refer, ann))
    assert not answer_known(*count, ann, set())


def test_grounded_description_and_refer():
    import random
    for seed in range(60):
        _, ann = make_scene(seed)
        q, a = question_answer(ann, "grounding", random.Random(0))
        assert q == "[grounding] Describe the image in detail."
        assert a.startswith("The image shows ") and a.endswith(".")
        assert sorted(parse_boxes(a)) == sorted(tuple(o["grid"]) for o in ann["objects"])
        if ann["objects"]:
            q, a = question_answer(ann, "refer", random.Random(seed))
            one = re.match(r"\[refer\] Give me the location of <p> (the .+) </p>$", q)  # as the bench asks
            expr = one.group(1) if one else re.match(r"\[grounding\](all .+)$", q).group(1)
            boxes = parse_boxes(a)
            assert BOX_RE.sub("", a) == ""
            if expr.startswith("the "):
                cls = expr[4:]
                objs = [o for o in ann["objects"] if o["class"] == cls]
                assert len(objs) == 1 and boxes == [tuple(objs[0]["grid"])]
            else:
                cls = [c for c in OBJECT_CLASSES if "all " + c + "s" == expr][0]
                objs = [o for o in ann["objects"] if o["class"] == cls]
                assert len(objs) >= 2 and boxes == [tuple(o["grid"]) for o in objs]
            q, a = question_answer(ann, "identify", random.Random(seed))
            (box,) = parse_boxes(q)
            (o,) = [o for o in ann["objects"] if tuple(o["grid"]) == box]
            assert a == "A %s." % o["class"]


def test_write_dataset_and_bench_files(tmp_path):
    paths = prepare_main(["scenes", "--out", str(tmp_path / "ds"), "--n-train", "30", "--n-test", "40",
                          "--seed", "3", "--size", "128"])
    for k in ("train", "test", "scene", "vqa", "referring", "region_captioning", "corpus"):
        assert Path(paths[k]).exists(), k
    train = json.loads(Path(paths["train"]).read_text())
    assert len(train) == 30 * 7
    names = {p.name for p in Path(paths["images"]).glob("*.png")}
    assert len(names) == 70
    assert all(r["image"] in names for r in train)
    ann = {}
    for line in Path(paths["annotations"]).read_text().splitlines():
        a = json.loads(line)
        ann[a["image"]] = a

    def jl(k):
        return [json.loads(l) for l in Path(paths[k]).read_text().splitlines()]

    scene = jl("scene")
    assert len(scene) == 40
    for d in scene:
        assert set(d) == {"question_id", "image", "text", "ground_truth"}
        assert d["image"].startswith("test_") and d["text"] == SCENE_PROMPT
        assert d["question_id"].split("/")[0] == d["ground_truth"] == ann[d["image"]]["scene"]
    vqa = jl("vqa")
    assert {d["category"] for d in vqa} == {"presence", "count", "comparison"}
    for d in vqa:
        assert set(d) == {"question_id", "image", "text", "category", "ground_truth"}
        assert d["text"].endswith(VQA_SUFFIX)
        if d["category"] == "count":
            assert d["ground_truth"].isdigit()
        else:
            assert d["ground_truth"] in ("yes", "no")
    ref = jl("referring")
    assert {d["type"] for d in ref} == {"ref", "grounding"}
    for d in ref:
        assert set(d) == {"question_id", "image_id", "image", "question", "ground_truth", "type",
                          "obj_ids", "size_group", "dataset"}
        assert d["size_group"] in ("small", "medium", "large") and d["dataset"] == "synthetic"
        objs = ann[d["image"]]["objects"]
        targets = [objs[i] for i in d["obj_ids"]]
        assert parse_boxes(d["ground_truth"]) == [tuple(o["grid"]) for o in targets]
        cls = {o["class"] for o in targets}
        assert len(cls) == 1
        (name,) = cls
        assert d["question"] == ("the " + name if d["type"] == "ref" else "all " + PLURALS[name])  # the expression, as in the real file
        # the expression picks out exactly its targets: all objects of that class
        assert len(targets) == sum(o["class"] in cls for o in objs)
        assert (d["type"] == "ref") == (len(targets) == 1)
    qids = [d["question_id"] for d in vqa + ref + jl("region_captioning")]
    assert len(set(qids)) == len(qids)
    for d in jl("region_captioning"):
        assert set(d) == {"question_id", "image", "question", "ground_truth"}
        (box,) = parse_boxes(d["question"])
        (o,) = [o for o in ann[d["image"]]["objects"] if tuple(o["grid"]) == box]
        assert d["ground_truth"] == "A %s." % o["class"]
    corpus = Path(paths["corpus"]).read_text()
    assert "[grounding] Describe the image in detail." in corpus and "ASSISTANT:" in corpus
    # a second run gives byte-identical files
    paths2 = write_dataset(tmp_path / "ds2", 30, 40, seed=3, workers=2)
    for k in ("train", "vqa", "referring", "corpus"):
        assert Path(paths[k]).read_bytes() == Path(paths2[k]).read_bytes(), k
    for n in sorted(names)[:10]:
        assert (Path(paths["images"]) / n).read_bytes() == (Path(paths2["images"]) / n).read_bytes()


def test_training_records_balanced():
    yes = {"Is there": [], "Are there more": []}
    for seed in range(300):
        _, ann = make_scene(seed)
        for r in instruct_records(ann, "x.png", n_records=7, rng_seed=1):
            conv = r["conversations"]
            for h, g in zip(conv[0::2], conv[1::2]):
                for k in yes:
                    if h["value"].replace("<image>\n", "").startswith(k):
                        assert g["value"] in ("Yes", "No")
                        yes[k].append(g["value"] == "Yes")
    for k, v in yes.items():
        assert len(v) > 200 and 0.42 <= sum(v) / len(v) <= 0.58, (k, sum(v) / len(v))


def test_prepare_cli_refuses_bad_input(tmp_path):
    import subprocess

    script = Path(__file__).resolve().parents[1] / "synthetic" / "prepare.py"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a few words\n")
    cases = [
        (["scenes", "--out", str(a_file)], f"--out {a_file}: exists and is not a directory"),
        (["scenes", "--out", str(tmp_path / "d"), "--n-train", "-1"], "--n-train must be >= 0, got -1"),
        (["scenes", "--out", str(tmp_path / "d"), "--n-train", "0", "--n-test", "0"], "nothing to write"),
        (["scenes", "--out", str(tmp_path / "d"), "--tasks", "grounding,dance"], "--tasks 'grounding,dance'"),
        (["scenes", "--out", str(tmp_path / "d"), "--object-scale", "nan"], "--object-scale must be in [0.5, 4]"),
        (["scenes", "--out", str(tmp_path / "d"), "--object-scale", "9"], "--object-scale must be in [0.5, 4]"),
        (["scenes", "--out", str(tmp_path / "d"), "--turns", "3"], "--turns '3': expected MIN-MAX"),
        (["scenes", "--out", str(tmp_path / "d"), "--turns", "5-4"], "--turns '5-4': expected MIN-MAX"),
        (["scenes", "--out", str(tmp_path / "d"), "--turns", "1-x"], "--turns '1-x': expected MIN-MAX"),
        (["tokenizer", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t.model")], "no such file"),
        (["tokenizer", "--corpus", str(corpus), "--out", str(tmp_path / "t.model"), "--vocab-size", "10"],
         "--vocab-size must be >= 300"),
        (["tokenizer", "--corpus", str(corpus), "--out", str(tmp_path)], "is a directory"),
        (["tokenizer", "--corpus", str(corpus), "--out", str(tmp_path / "t.model"), "--vocab-size", "350", "--box-pieces"],
         "--vocab-size must be >= 401"),
        (["tokenizer", "--corpus", str(corpus), "--out", str(tmp_path / "t.model"), "--vocab-size", "405", "--box-pieces",
          "--prompt-pieces"], "--vocab-size must be >= 409"),
    ]
    for argv, message in cases:
        r = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
    assert a_file.read_text() == "x" and not (tmp_path / "d").exists()


def test_tokenizer_says_when_the_corpus_gives_fewer_pieces(tmp_path, capsys):
    import argparse

    from synthetic.prepare import tokenizer_main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("two planes\n" * 50)
    out = tmp_path / "tokenizer.model"
    tokenizer_main(argparse.Namespace(corpus=str(corpus), out=str(out), vocab_size=2000, box_pieces=False, prompt_pieces=False))
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(out)).get_piece_size()
    assert pieces < 2000
    assert f"the corpus only supports {pieces} pieces, fewer than --vocab-size 2000" in capsys.readouterr().err


def test_prompt_pieces_make_each_fixed_phrase_one_token_and_change_no_text(tmp_path):
    """prepare.py tokenizer --prompt-pieces: each fixed prompt phrase, where the prompts write it, is one piece; every
    training record's tokens decode to the same text as with the plain tokenizer, and its labels mark the same answers."""
    from data import FIXED_PROMPT_PHRASES, Tokenizer, encode_conversation, task_prompt
    from synthetic.prepare import train_tokenizer, write_dataset

    paths = write_dataset(tmp_path / "synth", n_train_images=8, n_test_images=0, seed=1, records_per_image=3,
                          multi_turn_prob=0.5)
    plain, _ = train_tokenizer(paths["corpus"], tmp_path / "plain.model", vocab_size=600, box_pieces=True)
    short, _ = train_tokenizer(paths["corpus"], tmp_path / "short.model", vocab_size=600, box_pieces=True,
                               prompt_pieces=True)
    tok, ref = Tokenizer(short), Tokenizer(plain)
    phrase_ids = {tok.sp.piece_to_id(p.replace(" ", "\u2581")) for p in FIXED_PROMPT_PHRASES}
    assert tok.unk_id not in phrase_ids and len(phrase_ids) == len(FIXED_PROMPT_PHRASES)
    turns = [(f"<image>\n{task_prompt('vqa', question='Is there a ship in the image?')}", "No"),
             (task_prompt("scene", classes=["water", "urban"]), "water"),
             (task_prompt("refer", expression="the ship"), "{<1><2><3><4>|<5>}"),
             (task_prompt("identify", box="{<1><2><3><4>|<5>}"), "A ship."), (task_prompt("grounding"), "A ship.")]
    for template in ("llava_v1", "vicuna_v1"):
        conversations = [{"from": who, "value": text} for turn in turns for who, text in zip(("human", "gpt"), turn)]
        ids, labels = encode_conversation(tok, conversations, template)
        assert len(phrase_ids & set(ids)) == 7  # one system prompt of the two, and the six instructions
        ref_ids, ref_labels = encode_conversation(ref, conversations, template)
        assert tok.decode(ids) == ref.decode(ref_ids)
        assert len(ids) <= len(ref_ids) - 40
    records = json.loads(paths["train"].read_text())
    for record in records:
        ids, labels = encode_conversation(tok, record["conversations"], "llava_v1")
        ref_ids, ref_labels = encode_conversation(ref, record["conversations"], "llava_v1")
        assert tok.decode(ids) == ref.decode(ref_ids)
        assert tok.decode([i for i, lab in zip(ids, labels) if lab != -100]) == \
            ref.decode([i for i, lab in zip(ref_ids, ref_labels) if lab != -100])


def test_grid_pretext_answer_marks_the_cells_an_object_covers():
    def scene(*objects):
        return {"seed": 0, "size": 128, "scene": "desert",
                "objects": [{"class": c, "grid": list(g)} for c, g in objects]}

    assert grid_answer(scene()) == "0" * GRID_CELLS ** 2
    # a vehicle filling cell (row 2, col 3) and a plane over the 2x2 cells at rows 5-6, cols 5-6
    answer = grid_answer(scene(("vehicle", (38, 26, 49, 36, 0)), ("plane", (63, 63, 87, 87, 0))))
    cells = {(k // GRID_CELLS, k % GRID_CELLS): d for k, d in enumerate(answer) if d != "0"}
    vehicle, plane = str(OBJECT_CLASSES.index("vehicle") + 1), str(OBJECT_CLASSES.index("plane") + 1)
    assert cells == {(2, 3): vehicle, (5, 5): plane, (5, 6): plane, (6, 5): plane, (6, 6): plane}
    # a sliver under the cover threshold is ground; turning the box moves what it covers
    assert grid_answer(scene(("vehicle", (24, 24, 26, 36, 0)))) == "0" * GRID_CELLS ** 2
    assert grid_answer(scene(("ship", (30, 45, 70, 55, 0)))) != grid_answer(scene(("ship", (30, 45, 70, 55, 80))))


def test_tasks_option_restricts_the_training_records_and_weights_them(tmp_path):
    paths = write_dataset(tmp_path, 6, 2, seed=1, size=32, records_per_image=4, multi_turn_prob=0.0,
                          tasks=("grid", "grid", "presence", "scene"))  # one record per task of the cycle
    records = json.loads(paths["train"].read_text())
    firsts = [r["conversations"][0]["value"] for r in records]
    n_grid = sum(f.startswith("<image>\n[grid]") for f in firsts)
    assert n_grid == 2 * 6 and all(f.startswith(("<image>\n[grid]", "<image>\nIs there a", "<image>\nClassify"))
                                   for f in firsts)
    assert all(len(r["conversations"][1]["value"]) == GRID_CELLS ** 2 for r in records
               if r["conversations"][0]["value"].startswith("<image>\n[grid]"))
    assert paths["referring"].read_text()  # the bench files still cover every bench


def test_object_scale_makes_larger_objects_that_still_fit_and_keeps_scale_one_unchanged():
    def areas(scale):
        out = []
        for seed in range(40):
            img, ann = make_scene(seed, object_scale=scale)
            for o in ann["objects"]:
                x1, y1, x2, y2, _ = o["grid"]
                assert 0 <= x1 < x2 <= 100 and 0 <= y1 < y2 <= 100
                out.append((x2 - x1) * (y2 - y1))
        return out

    for seed in (0, 5):
        assert png_bytes(make_scene(seed, object_scale=1.0)[0]) == png_bytes(make_scene(seed)[0])
    small, large = areas(1.0), areas(2.5)
    assert large and sum(large) / len(large) > 3 * sum(small) / len(small)


def test_box_pieces_make_each_box_value_one_token(tmp_path):
    """prepare.py tokenizer --box-pieces: "<0>" ... "<100>" are single pieces; text round-trips exactly."""
    from data import Tokenizer
    from boxes import BOX_VALUE_PIECES
    from synthetic.prepare import train_tokenizer, write_dataset

    paths = write_dataset(tmp_path / "synth", n_train_images=6, n_test_images=0, seed=1, records_per_image=2)
    plain, _ = train_tokenizer(paths["corpus"], tmp_path / "plain.model", vocab_size=500)
    boxed, _ = train_tokenizer(paths["corpus"], tmp_path / "boxed.model", vocab_size=500, box_pieces=True)
    text = "The image shows <p>a plane</p> {<45><42><74><100>|<0>}{<7><9><13><88>|<89>}."
    tok, ref = Tokenizer(boxed), Tokenizer(plain)
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode(text)]
    assert {"<45>", "<42>", "<74>", "<100>", "<0>", "<7>", "<89>"} <= set(pieces)
    assert all(tok.sp.piece_to_id(p) != tok.unk_id for p in BOX_VALUE_PIECES)
    assert tok.decode(tok.encode(text)) == text == ref.decode(ref.encode(text))
    assert len(tok.encode(text)) <= len(ref.encode(text)) - 10  # 4 + 1 values a box, one token each
