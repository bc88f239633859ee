"""GeoChat-Bench: answer generation (`run`) and scoring (`score`).

Usage::

    python eval.py run --bench BENCH --questions FILE.jsonl --image-folder DIR --checkpoint DIR --answers OUT.jsonl
    python eval.py score --bench BENCH --answers OUT.jsonl [--gt FILE] [--questions FILE] [--include-count] [--gt-size N]

BENCH is one of scene, vqa, referring, region_captioning (the names of the benches' files). ``score``
needs no torch: it scores answer files of this project or of the original GeoChat scripts on any
machine. It prints a readable table and, as its LAST line, one JSON object with the metrics.
Answers files are JSON lines with ``question_id``, ``answer`` and the fields the reference's
``geochat/eval/batch_geochat_*.py`` scripts write (``image_id``, ``ground_truth``, ``question``,
``type``, ``dataset``, ``obj_ids``, ``size_group`` ...); ``run`` adds ``bench`` to every row so that a
file of another bench is refused. A line whose ``answer`` is missing or null (failed generation)
counts as wrong and is reported under ``failed``. Fields missing from the answers (the reference's
VQA script writes no ``category``) can be filled from the bench's question file with
``--questions`` (joined by ``question_id``).

Protocols
---------
scene (UCMerced / AID)
    class = ``question_id.split('/')[0]`` when the id has a '/', else ``ground_truth``; answer and
    class lower-cased with spaces and '.' removed; exact match. ``accuracy`` and per-class.
vqa (RSVQA LRBEN / HRBEN)
    answers and ground truth lower-cased, stripped, one trailing '.' removed; exact match.
    Ground truth from the row (``ground_truth``/``gt``) or from ``--gt`` (an RSVQA answers file:
    JSON list / ``{"answers": [...]}`` / JSONL of ``{"question_id" or "id", "answer"}``), joined
    by question id. Category from ``category`` (else ``type``). The ``count`` category is
    excluded unless ``--include-count``. ``accuracy`` is over all scored questions, ``average``
    is the mean of the per-category accuracies (the paper's "avg").
referring (``referring.jsonl``: rows of type ``ref`` and ``grounding``)
    Predicted boxes are parsed from ``answer``: GeoChat box strings ``{<x1><y1><x2><y2>|<θ>}``
    (``boxes.parse_boxes``), else bracketed number lists of 4 ([x1,y1,x2,y2]), 5 ([..., θ]) or 8
    (a 4-corner polygon) numbers. Ground truth (``ground_truth``) may be a box string, 4/5-number
    boxes, 8-number polygons or lists of four [x, y] corners. A box (x1,y1,x2,y2,θ) is the
    axis-aligned rectangle rotated by θ degrees about its centre (``boxes.box_polygon_grid``);
    reversed corners are sorted, θ is taken modulo 360. Predictions live on the 0-100 grid of the
    (padded, square) image; the released ``referring.jsonl`` stores ground-truth polygons in
    *pixels* of square images whose side is given by ``dataset`` (FAST 600, SIOR 800, SOTA 1024),
    so ground truth is rescaled to the grid when ``dataset`` names one of these (or a row carries
    ``image_size`` = side or [W, H], or ``--gt-size`` is given); otherwise it is taken as already
    on the 0-100 grid. IoU is the exact area IoU of the two convex quadrilaterals (convex hull of
    the corners, Sutherland-Hodgman clipping, shoelace area; zero-area boxes give IoU 0).

    MATCHING RULE: a sample is correct iff the number of predicted boxes equals the number of
    ground-truth objects AND there is a one-to-one assignment of predictions to ground-truth
    objects in which every assigned pair has IoU >= 0.5. The assignment is found exactly as a
    maximum-cardinality bipartite matching (augmenting paths) over the pairs with IoU >= 0.5, so
    the order of the predicted boxes does not matter. Zero predictions, extra or missing boxes,
    or any object without a partner at IoU >= 0.5 make the sample wrong.

    Metrics: ``acc@0.5`` overall, by ``size_group``, by object count (single = 1 ground-truth
    object, multi = more), by ``type`` (ref / grounding), and ``mean_iou_single``: over
    single-object samples, the best IoU between the object and any predicted box (0 when none).
    Rows whose ground truth holds no box are skipped and counted as ``no_gt``.
region_captioning
    ``<p>``/``</p>`` tags and box strings are dropped; tokens are the lower-cased maximal runs of
    ASCII letters/digits. ROUGE-1 = F1 of clipped unigram overlap; ROUGE-L = F1 of the longest
    common subsequence (beta = 1). METEOR follows Banerjee & Lavie as implemented by NLTK
    (alpha 0.9, beta 3, gamma 0.5: fmean = P*R / (alpha*P + (1-alpha)*R), penalty =
    gamma * (chunks / matches)^beta, score = (1 - penalty) * fmean) with the EXACT-match stage
    only: NLTK's greedy alignment (hypothesis words right to left, each taken by the right-most
    unmatched identical reference word). The stem and WordNet-synonym stages are omitted, so the
    numbers are not identical to NLTK's full METEOR (they are a lower bound of it). Several
    references: the maximum per metric. Each metric is a mean over samples, in 0..1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from collections import Counter
from typing import Any, Iterable, Sequence

from boxes import Box, Point, box_polygon_grid, parse_boxes, polygon_iou

BENCHES = ("scene", "vqa", "referring", "region_captioning")  # also the names of the question files

# Square image sides of the referring.jsonl source datasets (ground truth is in their pixels).
DATASET_SIZES = {"FAST": 600, "SIOR": 800, "SOTA": 1024}

IOU_THRESHOLD = 0.5


class InputError(ValueError):
    """A malformed input file (reported by the CLI with exit code 2)."""


# --------------------------------------------------------------------------- input


def _read_text(path: str) -> str:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file (expected JSON lines)") from None


def read_jsonl(path: str, drop_truncated_tail: bool = False) -> list[dict]:
    """Read a JSON-lines file into a list of dicts (blank lines skipped; bad lines raise InputError).

    With drop_truncated_tail, an unparsable last line without its newline (a write cut short by a
    crash) is dropped with a warning instead.
    """
    text = _read_text(path)
    lines = text.split("\n")
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if drop_truncated_tail and lineno == len(lines):  # the last line, with no newline after it
                print(f"warning: {path}:{lineno}: dropping a truncated last line", file=sys.stderr)
                break
            raise InputError(f"{path}:{lineno}: not valid JSON") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{lineno}: not a JSON object")
        rows.append(obj)
    return rows


def load_records(path: str) -> list[dict]:
    """Read records from JSONL, a JSON list, a JSON dict wrapping one list, or a {id: answer} dict."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return read_jsonl(path)
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
        elif "question_id" in data or "id" in data:
            data = [data]
        else:
            data = [{"question_id": k, "answer": v} for k, v in data.items()]
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of records")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise InputError(f"{path}: record {i} is not an object")
        out.append(rec)
    return out


def _qid(rec: dict) -> str | None:
    q = rec.get("question_id", rec.get("id"))
    return None if q is None else str(q)


def merge_questions(rows: list[dict], questions: list[dict]) -> list[dict]:
    """Fill fields missing from answer rows with those of the question with the same question_id."""
    by_id = {}
    for q in questions:
        k = _qid(q)
        if k is not None:
            by_id.setdefault(k, q)
    out = []
    for r in rows:
        q = by_id.get(_qid(r) or "")
        if q is None:
            out.append(r)
            continue
        merged = dict(r)
        for k, v in q.items():
            if k not in merged or merged[k] is None:
                merged[k] = v
        out.append(merged)
    return out


def _answer(row: dict) -> str | None:
    a = row.get("answer")
    if a is None:
        return None
    return a if isinstance(a, str) else str(a)


def _ratio(c: int, n: int) -> float | None:
    return c / n if n else None


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _group(counts: dict[str, list[int]]) -> dict:
    return {k: {"n": n, "correct": c, "accuracy": _ratio(c, n)}
            for k, (c, n) in sorted(counts.items(), key=lambda kv: str(kv[0]))}


# --------------------------------------------------------------------------- scene


def _norm_scene(s: str) -> str:
    return str(s).lower().replace(" ", "").replace(".", "")


def score_scene(rows: list[dict]) -> dict:
    """Scene-classification accuracy overall and per class (reference protocol)."""
    correct = n = failed = missing = 0
    per: dict[str, list[int]] = {}
    for r in rows:
        qid = str(r.get("question_id", ""))
        if "/" in qid:
            cls = qid.split("/")[0]
        elif r.get("ground_truth") is not None:
            cls = str(r["ground_truth"])
        else:
            missing += 1
            continue
        key = _norm_scene(cls)
        ans = _answer(r)
        ok = ans is not None and _norm_scene(ans) == key
        failed += ans is None
        n += 1
        correct += ok
        g = per.setdefault(key, [0, 0])
        g[0] += ok
        g[1] += 1
    return {"bench": "scene", "n": n, "correct": correct, "failed": failed, "missing_gt": missing,
            "accuracy": _ratio(correct, n), "per_class": _group(per)}


# --------------------------------------------------------------------------- vqa


def _norm_vqa(s: Any) -> str:
    s = str(s).lower().strip()
    if s.endswith("."):
        s = s[:-1]
    return s.strip()


def _gt_map(gt: Iterable[dict] | dict | None) -> dict[str, Any]:
    if gt is None:
        return {}
    if isinstance(gt, dict):
        return {str(k): v for k, v in gt.items()}
    active: dict[str, Any] = {}
    inactive: dict[str, Any] = {}
    for rec in gt:
        k = _qid(rec)
        if k is None or "answer" not in rec:
            continue
        target = inactive if rec.get("active") is False else active
        target.setdefault(k, rec["answer"])
    for k, v in inactive.items():
        active.setdefault(k, v)
    return active


def score_vqa(rows: list[dict], gt: Iterable[dict] | dict | None = None,
              include_count: bool = False) -> dict:
    """RSVQA accuracy overall, per category and their average (count excluded unless asked)."""
    gmap = _gt_map(gt)
    per: dict[str, list[int]] = {}
    correct = n = failed = missing = excluded = 0
    for r in rows:
        k = _qid(r)
        truth = gmap.get(k) if k is not None and k in gmap else r.get("ground_truth", r.get("gt"))
        cat = r.get("category", r.get("type"))
        cat = "unknown" if cat is None else str(cat)
        if cat.lower() == "count" and not include_count:
            excluded += 1
            continue
        if truth is None:
            missing += 1
            continue
        ans = _answer(r)
        ok = ans is not None and _norm_vqa(ans) == _norm_vqa(truth)
        failed += ans is None
        n += 1
        correct += ok
        g = per.setdefault(cat, [0, 0])
        g[0] += ok
        g[1] += 1
    per_cat = _group(per)
    avg = _mean([v["accuracy"] for v in per_cat.values()])
    return {"bench": "vqa", "n": n, "correct": correct, "failed": failed, "missing_gt": missing,
            "excluded_count": excluded, "accuracy": _ratio(correct, n), "average": avg,
            "per_category": per_cat}


# --------------------------------------------------------------------------- boxes


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return None
    try:
        f = float(v)
    except ValueError:
        return None
    return f if math.isfinite(f) else None


def _box_poly(x1: float, y1: float, x2: float, y2: float, angle: float = 0.0) -> list[Point]:
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    return [(float(x), float(y)) for x, y in
            box_polygon_grid(Box(x1, y1, x2, y2, angle % 360.0))]


def _numbers_to_poly(nums: Sequence[Any]) -> list[Point] | None:
    vals = [_num(v) for v in nums]
    if any(v is None for v in vals):
        return None
    if len(vals) in (4, 5):
        return _box_poly(*vals)
    if len(vals) == 8:
        return [(vals[i], vals[i + 1]) for i in range(0, 8, 2)]
    return None


def _is_pair(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_num(x) is not None for x in v)


_NUM = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
_BRACKET_RE = re.compile(r"[\[(]\s*(" + _NUM + r"(?:\s*[,;\s]\s*" + _NUM + r")*)\s*[\])]")


def _boxes_from_text(text: str) -> list[list[Point]]:
    boxes = parse_boxes(text)
    if boxes:
        return [_box_poly(b.x1, b.y1, b.x2, b.y2, b.angle or 0.0) for b in boxes]
    stripped = text.strip()
    if stripped[:1] in "[{":
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, list):
            return boxes_from_field(data)
    polys = []
    for m in _BRACKET_RE.finditer(text):
        nums = re.findall(_NUM, m.group(1))
        poly = _numbers_to_poly(nums)
        if poly is not None:
            polys.append(poly)
    return polys


def boxes_from_field(value: Any) -> list[list[Point]]:
    """Turn a GT/prediction field (box string or number lists) into 4-corner polygons; junk is skipped."""
    if value is None:
        return []
    if isinstance(value, str):
        return _boxes_from_text(value)
    if not isinstance(value, (list, tuple)) or not value:
        return []
    # a single polygon given as four [x, y] pairs
    if len(value) == 4 and all(_is_pair(p) for p in value):
        return [[(float(p[0]), float(p[1])) for p in value]]
    # a single flat box / polygon
    if all(not isinstance(v, (list, tuple, dict)) for v in value):
        if all(isinstance(v, str) for v in value) and not all(_num(v) is not None for v in value):
            return [p for v in value for p in _boxes_from_text(v)]
        poly = _numbers_to_poly(value)
        return [poly] if poly is not None else []
    polys = []
    for item in value:
        polys.extend(boxes_from_field(item))
    return polys


def _gt_to_grid(polys: list[list[Point]], row: dict, gt_size: Any = None) -> list[list[Point]]:
    size = gt_size if gt_size is not None else row.get("image_size")
    if size is None:
        ds = row.get("dataset")
        size = DATASET_SIZES.get(str(ds).upper()) if ds is not None else None
    if size is None:
        return polys
    if isinstance(size, (list, tuple)):
        w, h = float(size[0]), float(size[1])
    else:
        w = h = float(size)
    side = max(w, h)
    ox, oy = (side - w) // 2, (side - h) // 2  # the image is centred in the padded square
    s = 100.0 / side
    return [[((x + ox) * s, (y + oy) * s) for x, y in p] for p in polys]


def _max_matching(adj: list[list[int]], n_right: int) -> int:
    """Size of a maximum bipartite matching (Kuhn's augmenting paths)."""
    match_r = [-1] * n_right

    def augment(u: int, seen: list[bool]) -> bool:
        for v in adj[u]:
            if not seen[v]:
                seen[v] = True
                if match_r[v] == -1 or augment(match_r[v], seen):
                    match_r[v] = u
                    return True
        return False

    return sum(augment(u, [False] * n_right) for u in range(len(adj)))


def match_boxes(pred: list[list[Point]], gt: list[list[Point]],
                threshold: float = IOU_THRESHOLD) -> tuple[bool, list[list[float]]]:
    """(correct, IoU matrix gt x pred) under the one-to-one IoU >= threshold matching rule."""
    ious = [[polygon_iou(g, p) for p in pred] for g in gt]
    if len(pred) != len(gt):
        return False, ious
    adj = [[j for j, v in enumerate(row) if v >= threshold] for row in ious]
    return _max_matching(adj, len(pred)) == len(gt), ious


def score_referring(rows: list[dict], gt_size: Any = None) -> dict:
    """Referring/grounding acc@0.5 overall, by size group, single/multi object and type; single-object mIoU."""
    n = correct = failed = no_gt = 0
    by_size: dict[str, list[int]] = {}
    by_count: dict[str, list[int]] = {}
    by_type: dict[str, list[int]] = {}
    single_ious: list[float] = []
    for r in rows:
        gt = _gt_to_grid(boxes_from_field(r.get("ground_truth")), r, gt_size)
        if not gt:
            no_gt += 1
            continue
        ans = _answer(r)
        failed += ans is None
        pred = boxes_from_field(ans) if ans is not None else []
        ok, ious = match_boxes(pred, gt)
        n += 1
        correct += ok
        if len(gt) == 1:
            single_ious.append(max(ious[0]) if pred else 0.0)
        for table, key in ((by_size, r.get("size_group")),
                           (by_count, "single" if len(gt) == 1 else "multi"),
                           (by_type, r.get("type"))):
            g = table.setdefault("unknown" if key is None else str(key), [0, 0])
            g[0] += ok
            g[1] += 1
    return {"bench": "referring", "n": n, "correct": correct, "failed": failed, "no_gt": no_gt,
            "acc@0.5": _ratio(correct, n), "mean_iou_single": _mean(single_ious),
            "by_size_group": _group(by_size), "by_object_count": _group(by_count),
            "by_type": _group(by_type)}


# --------------------------------------------------------------------------- captions


_TAG_RE = re.compile(r"</?p>|\{<[^{}]*>\}|<unk>|</s>", re.IGNORECASE)
_TOKEN_RE = re.compile(r"[a-z0-9]+")


def tokenize(text: str | Sequence[str]) -> list[str]:
    """Lower-cased runs of ASCII letters/digits (tags and box strings removed); lists pass through."""
    if not isinstance(text, str):
        return [t.lower() for t in text]
    return _TOKEN_RE.findall(_TAG_RE.sub(" ", text).lower())


def _f1(overlap: int, n_hyp: int, n_ref: int) -> float:
    if overlap == 0 or n_hyp == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_hyp, overlap / n_ref
    return 2 * p * r / (p + r)


def rouge_n(hypothesis: str | Sequence[str], reference: str | Sequence[str], n: int = 1) -> float:
    """ROUGE-N F1 between a hypothesis and a reference (strings are tokenised)."""
    h, r = tokenize(hypothesis), tokenize(reference)
    hg = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
    rg = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
    overlap = sum((hg & rg).values())
    return _f1(overlap, sum(hg.values()), sum(rg.values()))


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hypothesis: str | Sequence[str], reference: str | Sequence[str]) -> float:
    """ROUGE-L F1 (longest common subsequence) between a hypothesis and a reference."""
    h, r = tokenize(hypothesis), tokenize(reference)
    return _f1(_lcs(h, r), len(h), len(r))


def _meteor_align(hyp: list[str], ref: list[str]) -> list[tuple[int, int]]:
    """NLTK's exact-match stage: hypothesis right to left, right-most unmatched equal reference word."""
    hyp_left = list(enumerate(hyp))
    ref_left = list(enumerate(ref))
    matches = []
    for i in range(len(hyp_left) - 1, -1, -1):
        for j in range(len(ref_left) - 1, -1, -1):
            if hyp_left[i][1] == ref_left[j][1]:
                matches.append((hyp_left[i][0], ref_left[j][0]))
                hyp_left.pop(i)
                ref_left.pop(j)
                break
    return sorted(matches)


def _chunks(matches: list[tuple[int, int]]) -> int:
    chunks = 1
    for (h0, r0), (h1, r1) in zip(matches, matches[1:]):
        if not (h1 == h0 + 1 and r1 == r0 + 1):
            chunks += 1
    return chunks


def meteor(hypothesis: str | Sequence[str], reference: str | Sequence[str],
           alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> float:
    """METEOR with exact matching only (NLTK formula and alignment; no stem/synonym stages)."""
    h, r = tokenize(hypothesis), tokenize(reference)
    if not h or not r:
        return 0.0
    matches = _meteor_align(h, r)
    m = len(matches)
    if m == 0:
        return 0.0
    p, rec = m / len(h), m / len(r)
    fmean = p * rec / (alpha * p + (1 - alpha) * rec)
    penalty = gamma * (_chunks(matches) / m) ** beta
    return (1 - penalty) * fmean


def score_region_caption(rows: list[dict]) -> dict:
    """Mean ROUGE-1, ROUGE-L and (exact-match) METEOR of region captions, in 0..1."""
    r1, rl, me = [], [], []
    failed = missing = 0
    for r in rows:
        refs = r.get("ground_truth")
        if refs is None:
            missing += 1
            continue
        refs = [refs] if isinstance(refs, str) else [str(x) for x in refs]
        if not refs:
            missing += 1
            continue
        ans = _answer(r)
        if ans is None:
            failed += 1
            for scores in (r1, rl, me):
                scores.append(0.0)
            continue
        r1.append(max(rouge_n(ans, ref, 1) for ref in refs))
        rl.append(max(rouge_l(ans, ref) for ref in refs))
        me.append(max(meteor(ans, ref) for ref in refs))
    return {"bench": "region_captioning", "n": len(r1), "failed": failed, "missing_gt": missing,
            "rouge1": _mean(r1), "rougeL": _mean(rl), "meteor": _mean(me)}


# --------------------------------------------------------------------------- output


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def format_table(metrics: dict) -> str:
    """Render a metrics dict (from a score_* function) as a readable plain-text table."""
    lines = [f"== {metrics.get('bench', 'metrics')} =="]
    scalars = [(k, v) for k, v in metrics.items() if k != "bench" and not isinstance(v, dict)]
    width = max([len(k) for k, _ in scalars] + [4])
    for k, v in scalars:
        lines.append(f"{k:<{width}}  {_fmt(v)}")
    for k, v in metrics.items():
        if not isinstance(v, dict):
            continue
        lines.append("")
        lines.append(f"-- {k} --")
        if not v:
            lines.append("(none)")
            continue
        kw = max([len(str(g)) for g in v] + [5])
        lines.append(f"{'group':<{kw}}  {'n':>6}  {'correct':>7}  {'accuracy':>8}")
        for g, d in v.items():
            if isinstance(d, dict):
                lines.append(f"{str(g):<{kw}}  {_fmt(d.get('n')):>6}  {_fmt(d.get('correct')):>7}  "
                             f"{_fmt(d.get('accuracy')):>8}")
            else:
                lines.append(f"{str(g):<{kw}}  {_fmt(d)}")
    return "\n".join(lines)


def score_file(bench: str, answers: str, gt: str | None = None, questions: str | None = None,
               include_count: bool = False, gt_size: Any = None) -> dict:
    """Score an answers JSONL file for a bench; returns the metrics dict."""
    rows = read_jsonl(answers)
    other = {str(r["bench"]) for r in rows if r.get("bench") not in (None, bench)}
    if other:
        raise InputError(f"{answers}: holds answers of bench {', '.join(sorted(other))}, not {bench}")
    if questions:
        rows = merge_questions(rows, load_records(questions))
    if bench == "scene":
        return score_scene(rows)
    if bench == "vqa":
        return score_vqa(rows, load_records(gt) if gt else None, include_count=include_count)
    if bench == "referring":
        if gt:
            rows = merge_questions(rows, load_records(gt))
        return score_referring(rows, gt_size=gt_size)
    if bench == "region_captioning":
        if gt:
            rows = merge_questions(rows, load_records(gt))
        return score_region_caption(rows)
    raise ValueError(f"unknown bench {bench!r}")


# --------------------------------------------------------------------------- run
# Answer generation needs torch and the model: `run_bench` and `question_prompt` import them when
# called, so that `score` (above) works on a machine without torch.

MAX_NEW_TOKENS = 256  # the reference's bench scripts generate up to 256 new tokens in every bench
QUESTION_FIELD = {"scene": "text", "vqa": "text", "referring": "question", "region_captioning": "question"}


def read_questions(path: str, bench: str) -> list[dict]:
    """A bench's question file, each row checked for an id, its prompt field and an image name."""
    questions = read_jsonl(path)
    if not questions:
        raise InputError(f"{path}: no questions")
    field = QUESTION_FIELD[bench]
    for i, q in enumerate(questions, 1):
        text = q.get(field)
        if _qid(q) is None:
            raise InputError(f"{path}: question {i} has no 'question_id'")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}: question {_qid(q)} has no '{field}' text (a {bench} question needs one)")
        if not str(q.get("image") or q.get("image_id") or "").strip():
            raise InputError(f"{path}: question {_qid(q)} names no 'image' or 'image_id'")
    return questions


def question_prompt(bench: str, q: dict) -> str:
    """The user message (without <image>) that the reference's bench scripts send for one question."""
    from data import task_prompt

    text = q[QUESTION_FIELD[bench]].strip()
    if bench == "referring":
        if text.startswith(("[refer]", "[grounding]")):
            return text
        return task_prompt("refer", expression=text) if q.get("type", "ref") == "ref" else "[grounding]" + text
    if bench == "region_captioning":
        return text if text.startswith("[identify]") else task_prompt("identify", box=text)
    return text  # scene and VQA files carry their whole prompt


def image_path(folder: str, q: dict) -> str:
    """The question's image file under folder (`image`, else `image_id` with or without its extension)."""
    name = str(q.get("image") or q.get("image_id") or "").strip()
    path = os.path.join(folder, name)
    if not os.path.exists(path) and not os.path.splitext(name)[1]:
        for ext in (".png", ".jpg", ".jpeg", ".tif"):
            if os.path.exists(path + ext):
                return path + ext
    return path


def resume_answers(path: str, bench: str) -> list[dict]:
    """Answer rows already in `path` worth keeping; a truncated last line and failed (null) answers are dropped."""
    if not os.path.exists(path):
        return []
    rows = read_jsonl(path, drop_truncated_tail=True)
    for row in rows:
        if row.get("bench", bench) != bench:
            raise InputError(f"{path}: holds answers of bench {row['bench']!r}, not {bench!r}; choose another --answers file")
    kept = [row for row in rows if row.get("answer") is not None]
    with open(path, encoding="utf-8") as f:
        n_lines = sum(1 for line in f if line.strip())
    if len(kept) != n_lines:  # rewrite without the dropped rows, atomically, so that they are answered again
        print(f"{path}: {n_lines - len(kept)} failed or truncated answers will be generated again", file=sys.stderr)
        directory = os.path.dirname(os.path.abspath(path))
        with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp", encoding="utf-8") as tmp:
            tmp.writelines(json.dumps(row) + "\n" for row in kept)
        os.replace(tmp.name, path)
    return kept


def run_bench(args: argparse.Namespace) -> int:
    """Answer a bench's question file into --answers (resuming: ids answered before are skipped), then score it."""
    import torch
    from tqdm import tqdm

    import data
    import sample

    questions = read_questions(args.questions, args.bench)
    if not os.path.isdir(args.image_folder):
        raise InputError(f"--image-folder {args.image_folder}: no such directory")
    os.makedirs(os.path.dirname(os.path.abspath(args.answers)), exist_ok=True)
    done = {_qid(row) for row in resume_answers(args.answers, args.bench)}
    todo = [q for q in questions if _qid(q) not in done]
    if done:  # a resume: say so, since answers of another checkpoint in the same file would be kept as they are
        print(f"{args.answers}: {len(done)} questions answered before are kept and skipped (remove the file to "
              f"answer them again)", file=sys.stderr)
    if args.limit is not None:
        todo = todo[: max(0, args.limit - len(done))]
    device = sample.pick_device(args.device)
    engine = sample.load(args.checkpoint, device, sample.DTYPES[args.dtype or sample.default_dtype(device)], args.lora,
                         compile=args.compile, vision_tower=args.vision_tower, quantize=args.quantize)
    size = engine.model.cfg.image_size
    failed = Counter()
    try:
        with open(args.answers, "a", encoding="utf-8") as out, tqdm(total=len(todo), desc=args.bench, unit="q") as bar:
            for start in range(0, len(todo), args.batch_size):
                batch, prompts, images, rows = todo[start:start + args.batch_size], [], [], []
                for q in batch:
                    row = dict(q, bench=args.bench)
                    try:
                        images.append(data.preprocess_image(data.load_image(image_path(args.image_folder, q)), size))
                    except (OSError, ValueError) as e:  # a missing or broken image: a failed answer, retried next run
                        row.update(answer=None, error=str(e))
                        failed[type(e).__name__] += 1
                    else:
                        prompts.append(engine.prompt_ids(data.IMAGE_PLACEHOLDER + "\n" + question_prompt(args.bench, q)))
                    rows.append(row)
                if prompts:
                    answers = iter(engine.generate(prompts, torch.stack(images), max_new_tokens=args.max_new_tokens))
                    for row in rows:
                        if "error" not in row:
                            row["answer"] = next(answers).text.strip()
                out.writelines(json.dumps(row) + "\n" for row in rows)
                out.flush()
                bar.update(len(batch))
    except KeyboardInterrupt:
        print(f"\ninterrupted: the answers so far are kept in {args.answers}; run the same command to continue",
              file=sys.stderr)
        return 130
    if failed:
        print(f"failed answers (missing or unreadable images, generated again next run): {dict(failed)}", file=sys.stderr)
    metrics = score_file(args.bench, args.answers)
    print(format_table(metrics))
    print(json.dumps(metrics))
    return 0


def _positive(flag: str, value, allow_none: bool = True):
    if value is None and allow_none:
        return
    if value is None or not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise InputError(f"{flag} must be a positive number, got {value}")


def _cmd_score(args: argparse.Namespace) -> int:
    _positive("--gt-size", args.gt_size)
    metrics = score_file(args.bench, args.answers, gt=args.gt, questions=args.questions,
                         include_count=args.include_count, gt_size=args.gt_size)
    print(format_table(metrics))
    print(json.dumps(metrics))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens)):
        _positive(flag, value)
    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    """The eval.py command-line parser (subcommands run and score)."""
    formatter = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="eval.py", description="GeoChat-Bench evaluation: generate answers, score them.",
                                formatter_class=formatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="answer a bench's questions with the model (resumable), then score",
                       formatter_class=formatter)
    r.add_argument("--bench", required=True, choices=BENCHES, help="which bench the question file belongs to")
    r.add_argument("--questions", required=True, help="the bench's question JSONL (e.g. referring.jsonl)")
    r.add_argument("--image-folder", required=True, help="folder holding the questions' images")
    r.add_argument("--checkpoint", required=True, help="model directory (any layout GeoChat.from_pretrained reads)")
    r.add_argument("--answers", required=True, help="answers JSONL: appended to, ids answered before are skipped")
    r.add_argument("--batch-size", type=int, default=1, help="questions per left-padded batch")
    r.add_argument("--limit", type=int, default=None, help="answer at most this many questions in all (default: every one)")
    r.add_argument("--lora", default=None, help="adapter directory written by train.py (merged before answering)")
    r.add_argument("--vision-tower", default=None, help="CLIP directory, for a release checkpoint without the tower's weights")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, then mps, then cpu")
    r.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on cuda, float16 on mps, float32 on cpu")
    r.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="per answer (the reference's bench scripts use 256)")
    r.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    r.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only int8 / int4 decoder linears and lm_head (after --lora is merged); see sample.py")
    r.set_defaults(func=_cmd_run)

    s = sub.add_parser("score", help="score an answers JSONL file (needs no torch)", formatter_class=formatter)
    s.add_argument("--bench", required=True, choices=BENCHES, help="which bench the answers belong to")
    s.add_argument("--answers", required=True, help="answers JSONL (ours or the original GeoChat scripts')")
    s.add_argument("--gt", default=None,
                   help="vqa: RSVQA answers file (JSON/JSONL, joined by question id); "
                        "other benches: records whose fields fill the answers' missing ones")
    s.add_argument("--questions", default=None, help="the bench's question file; fills fields missing from answer rows")
    s.add_argument("--include-count", action="store_true", help="vqa: keep the count category")
    s.add_argument("--gt-size", type=float, default=None,
                   help="referring: ground truth is in pixels of an NxN image (default: from each row's 'dataset')")
    s.set_defaults(func=_cmd_score)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: bad input is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InputError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
