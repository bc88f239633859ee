"""Why does a Baby GeoChat not find its objects? Six measurements on a checkpoint and its synthetic data.

    python scripts/diagnose_baby.py --checkpoint checkpoints/baby-geochat --data runs/baby-work/data --out runs/diagnosis

1. accuracy on *training* scenes against held-out ones (VQA and [refer], through `eval.py run`):
   equal and low means underfitting, high on train only means not generalising;
2. linear probes on the vision tower's selected-layer features and on the projector's output:
   presence of each object class (mean-pooled patches), "an object covers this patch's centre"
   (per patch, the position signal grounding needs) and the covering object's box angle (error in
   degrees, 22.5 = nothing read), against the same probes on a freshly
   initialised tower, so the gap is what training put there;
3. gradient norms reaching the tower, the projector and the decoder on one training batch;
4. where the decoder looks when it answers a presence question: its attention on the image tokens, and
   within them on the patches the objects cover;
5. whether the answer depends on the class asked: "Is there a <class>?" for every class on each held-out scene
   (the Yes-minus-No logit margin of present classes against absent ones of the same scene: 0.5 means the answer
   ignores the class), and where single-object [refer] boxes land (on the target, on another object, on nothing)
   by the number of objects in the scene, where 1/n is what a model that ignores the class gets; and, for the boxes
   on their target, how many would pass IoU 0.5 with the true angle in place of theirs;
6. where the ground it names comes from: the ground whose answer is likeliest, asked the scene question and the
   grounded-description question ("The image shows <ground> ..."), on each held-out scene with objects as drawn and
   on the same scene rendered again without its objects (the same texture), beside linear probes for the ground on the
   tower's and projector's features. Right on the bare ground and wrong with the objects drawn: the decoder reads the
   ground off the objects; wrong both ways while the probes read it: the decoder does not read a ground its inputs carry.
The pipeline itself (each sample trained with its own image, identical preprocessing in training and
inference) is checked by tests/test_pipeline.py. Everything prints as one report (also --json).
"""

import argparse
import contextlib
import json
import math
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import eval as bench_eval  # noqa: E402
from boxes import Box, box_polygon_grid, parse_boxes, polygon_iou  # noqa: E402
from geochat import GeoChat  # noqa: E402
from synthetic.scenes import (GROUNDING_PROMPT, OBJECT_CLASSES, SCENE_CLASSES, SCENE_PROMPT, bench_questions,  # noqa: E402
                              description_head, make_scene)
from synthetic.pretrain_tower import angle_error_deg  # noqa: E402
from train import CausalLMLoss, init_weights  # noqa: E402


def read_annotations(data_dir: Path, split: str, n: int) -> list[dict]:
    """The first n annotations (all when n < 0) of a split ("train" or "test") of a prepared synthetic dataset."""
    rows = []
    with open(data_dir / "annotations.jsonl", encoding="utf-8") as f:
        for line in f:
            ann = json.loads(line)
            if ann["image"].startswith(split + "_"):
                rows.append(ann)
                if len(rows) == n:
                    break
    return rows


def bench_accuracy(checkpoint: Path, data_dir: Path, anns: list[dict], out_dir: Path, tag: str) -> dict:
    """VQA per category and [refer] acc@0.5 per type on these scenes, through eval.py run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {"vqa": [], "referring": []}
    qid = 0
    for ann in anns:
        per_bench, qid = bench_questions(ann, ann["image"], start_qid=qid)
        for bench in rows:
            rows[bench].extend(per_bench[bench])
    metrics = {}
    for bench, questions in rows.items():
        qfile, afile = out_dir / f"{tag}_{bench}_questions.jsonl", out_dir / f"{tag}_{bench}_answers.jsonl"
        qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
        afile.unlink(missing_ok=True)
        with contextlib.redirect_stdout(sys.stderr):  # eval.py's own table: the report is printed at the end
            code = bench_eval.main(["run", "--bench", bench, "--questions", str(qfile), "--image-folder",
                                    str(data_dir / "images"), "--checkpoint", str(checkpoint), "--answers", str(afile),
                                    "--batch-size", "32", "--device", "cpu", "--dtype", "float32"])
        if code != 0:
            raise SystemExit(f"eval.py run failed on {qfile}")
        metrics[bench] = bench_eval.score_file(bench, str(afile))
    return metrics


def covering_objects(ann: dict, grid: int) -> list[dict | None]:
    """Per patch (grid*grid), the object whose rotated box holds the patch's centre, or None."""
    polys = [(box_polygon_grid(Box(*o["grid"])), o) for o in ann["objects"]]
    out = []
    for k in range(grid * grid):
        cy, cx = (k // grid + 0.5) * 100 / grid, (k % grid + 0.5) * 100 / grid
        out.append(next((o for poly, o in polys if point_in_convex(cx, cy, poly)), None))
    return out


def patch_targets(ann: dict, grid: int) -> torch.Tensor:
    """(grid*grid,) 1.0 where a patch's centre lies inside an object's rotated box."""
    return torch.tensor([float(o is not None) for o in covering_objects(ann, grid)])


def patch_angles(ann: dict, grid: int) -> torch.Tensor:
    """(grid*grid,) the box angle (degrees) of the object covering each patch's centre; nan on ground and on storage
    tanks (round: their angle is always 0 and says nothing)."""
    return torch.tensor([o["grid"][4] if o is not None and o["class"] != "storage tank" else math.nan
                         for o in covering_objects(ann, grid)], dtype=torch.float32)


def point_in_convex(x: float, y: float, poly) -> bool:
    """Whether (x, y) lies inside a convex polygon (either winding)."""
    signs = set()
    for (ax, ay), (bx, by) in zip(poly, poly[1:] + poly[:1]):
        cross = (bx - ax) * (y - ay) - (by - ay) * (x - ax)
        if cross != 0:
            signs.add(cross > 0)
    return len(signs) <= 1


@torch.no_grad()
def features(model: GeoChat, data_dir: Path, anns: list[dict], batch: int = 64):
    """(tower features (N, P, Cv), projector outputs (N, P, D)) of the scenes' images, float32."""
    size = model.cfg.image_size
    tower, proj = [], []
    for i in range(0, len(anns), batch):
        imgs = torch.stack([data.preprocess_image(data.load_image(data_dir / "images" / a["image"]), size)
                            for a in anns[i:i + batch]])  # (b, 3, S, S)
        f = model.vision(imgs)  # (b, P, Cv)
        tower.append(f.float())
        proj.append(model.projector(f).float())
    return torch.cat(tower), torch.cat(proj)


def fit_probe(x_train, y_train, x_test, y_test, steps: int = 300) -> float:
    """Balanced accuracy on the test split of a logistic-regression probe (standardised inputs, L-BFGS)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    w = torch.zeros(x_train.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    pos = y_train.mean().clamp(1e-3, 1 - 1e-3)
    weight = torch.where(y_train > 0.5, 0.5 / pos, 0.5 / (1 - pos))  # balanced classes

    def closure():
        opt.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(x_train @ w + b, y_train, reduction="none") * weight).mean()
        loss = loss + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (x_test @ w + b) > 0
        yes = y_test > 0.5
        tpr = (pred & yes).sum() / yes.sum().clamp_min(1)
        tnr = (~pred & ~yes).sum() / (~yes).sum().clamp_min(1)
    return float((tpr + tnr) / 2)


def angle_probe_error(x_train, angle_train, x_test, angle_test, ridge: float = 1.0) -> float:
    """Mean error in degrees, modulo 90 (a box turned by 90 is the same box with its sides swapped), of a ridge
    probe reading the box angle off features through (cos 4a, sin 4a); 22.5 is what a probe that reads nothing gets."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std  # (N, C)
    target = torch.stack([torch.cos(torch.deg2rad(4 * angle_train)), torch.sin(torch.deg2rad(4 * angle_train))], -1)
    target_mean = target.mean(0)
    gram = x_train.T @ x_train + ridge * torch.eye(x_train.shape[1])  # (C, C)
    weight = torch.linalg.solve(gram, x_train.T @ (target - target_mean))  # (C, 2)
    pred = x_test @ weight + target_mean  # (M, 2)
    pred_angle = torch.rad2deg(torch.atan2(pred[:, 1], pred[:, 0])) / 4 % 90
    return float(angle_error_deg(pred_angle, angle_test).mean())


def probes(model: GeoChat, data_dir: Path, train_anns, test_anns) -> dict:
    """Balanced accuracies of presence-per-class and patch-covered probes on tower and projector features, and the
    error in degrees of an angle probe on the patches of objects with an angle."""
    grid = model.cfg.vision.grid
    tr_t, tr_p = features(model, data_dir, train_anns)
    te_t, te_p = features(model, data_dir, test_anns)
    covered_tr = torch.cat([patch_targets(a, grid) for a in train_anns])  # (n_train * grid * grid,)
    covered_te = torch.cat([patch_targets(a, grid) for a in test_anns])
    a_tr = torch.cat([patch_angles(a, grid) for a in train_anns])  # nan where no object has an angle
    a_te = torch.cat([patch_angles(a, grid) for a in test_anns])
    on_tr, on_te = ~a_tr.isnan(), ~a_te.isnan()
    out = {}
    for name, (tr, te) in {"tower": (tr_t, te_t), "projector": (tr_p, te_p)}.items():
        row = {}
        for cls in OBJECT_CLASSES:
            y_tr = torch.tensor([float(any(o["class"] == cls for o in a["objects"])) for a in train_anns])
            y_te = torch.tensor([float(any(o["class"] == cls for o in a["objects"])) for a in test_anns])
            row["presence " + cls] = fit_probe(tr.mean(1), y_tr, te.mean(1), y_te)
        row["patch covered"] = fit_probe(tr.flatten(0, 1), covered_tr, te.flatten(0, 1), covered_te)
        row["angle error deg"] = angle_probe_error(tr.flatten(0, 1)[on_tr], a_tr[on_tr],
                                                   te.flatten(0, 1)[on_te], a_te[on_te])
        out[name] = row
    return out


def gradient_norms(model: GeoChat, tokenizer, data_dir: Path, n: int = 32, seed: int = 0) -> dict:
    """L2 norm of the loss gradient (mean per labelled token) in each part of the model, one batch of n records."""
    dataset = data.InstructDataset(data_dir / "train.json", data_dir / "images", tokenizer,
                                   image_size=model.cfg.image_size, max_length=model.cfg.llm.max_seq_len,
                                   n_image_tokens=model.n_image_tokens)
    rng = random.Random(seed)
    items = [dataset[i] for i in rng.sample(range(len(dataset)), n)]
    batch = data.collate(items, tokenizer.pad_id)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    loss_model = CausalLMLoss(model)
    loss = loss_model(batch["input_ids"], batch["labels"], batch["images"])
    (loss / int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())).backward()
    norms = {}
    for part in ("vision", "projector", "llm"):
        grads = [p.grad.float().square().sum() for p in getattr(model, part).parameters() if p.grad is not None]
        weights = [p.detach().float().square().sum() for p in getattr(model, part).parameters()]
        norms[part] = {"grad": math.sqrt(float(sum(grads))), "weight": math.sqrt(float(sum(weights)))}
    model.eval()
    return norms


@torch.no_grad()
def image_attention(model: GeoChat, tokenizer, data_dir: Path, anns: list[dict]) -> dict:
    """Where the answer's first position looks, per decoder layer and head, on presence questions about these scenes.

    share: attention on the image tokens (uniform attention pays n_image / prompt length); on_objects: of
    that, the part on patches an object covers (no preference: their share of the patches, `object_patches`);
    spread: perplexity of the attention over the image tokens (n_image = even, 1 = one token).
    """
    from llama import apply_rope
    from synthetic.scenes import question_answer

    captured = []
    hooks = [layer.attn.register_forward_hook(lambda mod, args, out: captured.append((mod, args)))
             for layer in model.llm.layers]
    shape = (len(model.llm.layers), model.cfg.llm.n_heads)
    share, on_objects, entropy = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    rng = random.Random(0)
    scenes = [a for a in anns if a["objects"]]
    object_patches = 0.0
    for ann in scenes:
        question, _ = question_answer(ann, "presence", rng)
        ids = tokenizer.encode_prompt(data.build_prompt([(data.IMAGE_PLACEHOLDER + "\n" + question, None)], "llava_v1"))
        image = data.preprocess_image(data.load_image(data_dir / "images" / ann["image"]), model.cfg.image_size)
        start, n = ids.index(data.IMAGE_TOKEN_ID), model.n_image_tokens
        covered = patch_targets(ann, model.cfg.vision.grid)  # (n,)
        object_patches += float(covered.mean()) / len(scenes)
        captured.clear()
        model(torch.tensor([ids]), image[None])
        for i, (attn, (x, cos, sin, *_)) in enumerate(captured):
            B, T, _ = x.shape
            q = apply_rope(attn.q_proj(x).view(B, T, attn.n_heads, -1).transpose(1, 2), cos, sin)[:, :, -1:]  # (1, H, 1, D)
            k = apply_rope(attn.k_proj(x).view(B, T, attn.n_kv_heads, -1).transpose(1, 2), cos, sin)
            k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)  # (1, H, T, D)
            weights = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)[0, :, 0]  # (H, T)
            on_image = weights[:, start:start + n]  # (H, n)
            share[i] += on_image.sum(-1) / len(scenes)
            within = on_image / on_image.sum(-1, keepdim=True).clamp_min(1e-12)
            on_objects[i] += (within * covered).sum(-1) / len(scenes)
            entropy[i] += -(within * within.clamp_min(1e-12).log()).sum(-1) / len(scenes)
    for h in hooks:
        h.remove()
    return {"share": share.tolist(), "on_objects": on_objects.tolist(), "spread": entropy.exp().tolist(),
            "object_patches": object_patches}


def within_scene_auc(margins: list[tuple[int, bool, float]]) -> float:
    """(scene, class present, margin) rows -> P(a present class's margin > an absent class's of the same scene),
    ties half: 1.0 answers by the class asked, 0.5 ignores it."""
    wins = pairs = 0.0
    scenes = {scene for scene, _, _ in margins}
    for scene in scenes:
        present = [m for s, p, m in margins if s == scene and p]
        absent = [m for s, p, m in margins if s == scene and not p]
        for a in present:
            for b in absent:
                wins += 1.0 if a > b else 0.5 if a == b else 0.0
                pairs += 1
    return wins / pairs if pairs else float("nan")


def first_answer_id(tokenizer, prompt_turns, answer: str) -> int:
    """The id of the answer's first token after the prompt, as training labels it."""
    asked = tokenizer.encode_prompt(data.build_prompt(prompt_turns, "llava_v1"))  # the last turn without its answer
    answered = tokenizer.encode_prompt(data.build_prompt(prompt_turns[:-1] + [(prompt_turns[-1][0], answer)], "llava_v1"))
    return answered[len(asked)]


@torch.no_grad()
def presence_by_class(model: GeoChat, tokenizer, data_dir: Path, anns: list[dict]) -> dict:
    """The Yes-minus-No margin of "Is there a <class> in the image?" for every class on each scene with objects:
    within-scene AUC of present against absent classes, the margin's spread over the classes of one scene against
    its spread over scenes, and per decoder layer probes of the answer position (balanced accuracy, 0.5 = chance)
    for the class asked and for whether it is present."""
    def turns(cls):
        return [(data.IMAGE_PLACEHOLDER + "\n" + data.task_prompt("vqa", question=f"Is there a {cls} in the image?"), None)]

    yes, no = (first_answer_id(tokenizer, turns(OBJECT_CLASSES[0]), a) for a in ("Yes", "No"))  # after "ASSISTANT:"
    rows, states, asked = [], [], []
    hooks = [layer.register_forward_hook(lambda mod, args, out: states.append(out[0, -1])) for layer in model.llm.layers]
    for k, ann in enumerate(a for a in anns if a["objects"]):
        image = data.preprocess_image(data.load_image(data_dir / "images" / ann["image"]), model.cfg.image_size)
        present = {o["class"] for o in ann["objects"]}
        for cls in OBJECT_CLASSES:
            ids = tokenizer.encode_prompt(data.build_prompt(turns(cls), "llava_v1"))
            logits = model(torch.tensor([ids]), image[None])[0, -1]  # (vocab,)
            rows.append((k, cls in present, float(logits[yes] - logits[no])))
            asked.append(OBJECT_CLASSES.index(cls))
    for h in hooks:
        h.remove()
    # linear probes on the answer position after each decoder layer, fitted on 70% of the scenes: does it hold the
    # class asked (one class against the others, averaged) and whether that class is in the image (the answer)?
    states = torch.stack(states).view(len(rows), len(model.llm.layers), -1)  # (rows, layers, dim)
    scene = torch.tensor([k for k, _, _ in rows])
    fit = scene < int(0.7 * (int(scene.max()) + 1))
    answer = torch.tensor([float(p) for _, p, _ in rows])
    asked = torch.tensor(asked)
    per_layer = []
    for layer in range(states.shape[1]):
        x = states[:, layer]
        which = [fit_probe(x[fit], (asked[fit] == c).float(), x[~fit], (asked[~fit] == c).float())
                 for c in range(len(OBJECT_CLASSES))]
        per_layer.append({"class asked": sum(which) / len(which),
                          "class present": fit_probe(x[fit], answer[fit], x[~fit], answer[~fit])})
    by_scene = {}
    for k, _, m in rows:
        by_scene.setdefault(k, []).append(m)
    means = torch.tensor([sum(v) / len(v) for v in by_scene.values()])
    within = sum(float(torch.tensor(v).std(correction=0)) for v in by_scene.values()) / len(by_scene)
    return {"within_scene_auc": within_scene_auc(rows), "margin_sd_over_classes": within,
            "margin_sd_over_scenes": float(means.std(correction=0)), "scenes": len(by_scene),
            "answer_position_probes": per_layer}


@torch.no_grad()
def answer_logprobs(model: GeoChat, tokenizer, prompt: str, answers: list[str], image: torch.Tensor) -> torch.Tensor:
    """(len(answers),) summed log-probability of each answer's tokens, as training labels them but without the closing
    "</s>" (an answer may be the start of a longer one), after the prompt asked about one image (3, S, S)."""
    items = []
    for answer in answers:
        turns = [{"from": "human", "value": data.IMAGE_PLACEHOLDER + "\n" + prompt}, {"from": "gpt", "value": answer}]
        ids, labels = data.encode_conversation(tokenizer, turns, "llava_v1")
        assert ids[-1] == labels[-1] == tokenizer.eos_id, "the answer's labels end with its </s>"
        labels[-1] = data.IGNORE_INDEX
        items.append(dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels), image=image))
    batch = data.collate(items, tokenizer.pad_id)
    embeds, mask, labels = model.embed_inputs(batch["input_ids"], batch["images"], batch["attention_mask"],
                                              batch["labels"])  # (A, L, dim), (A, L), (A, L)
    log_probs = model.forward_embeds(embeds, mask).float().log_softmax(-1)[:, :-1]  # (A, L-1, vocab)
    targets = labels[:, 1:]  # (A, L-1)
    labelled = targets != data.IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp_min(0)[..., None])[..., 0]  # (A, L-1)
    return (picked * labelled).sum(-1)


@torch.no_grad()
def ground_choice(model: GeoChat, tokenizer, data_dir: Path, anns: list[dict]) -> dict:
    """Share of the scenes with objects whose ground the decoder names right, asked the scene question (the ground's
    name) and the grounded-description question (its first words, `description_head`), the image as drawn ("drawn")
    and the same scene rendered without its objects ("bare": the same ground texture, `make_scene(draw_objects=False)`)."""
    size = model.cfg.image_size
    questions = {"scene question": (SCENE_PROMPT, list(SCENE_CLASSES)),
                 "description": (GROUNDING_PROMPT, [description_head(ground) for ground in SCENE_CLASSES])}
    right = {question: {"drawn": 0, "bare": 0} for question in questions}
    scenes = [a for a in anns if a["objects"]]
    for ann in scenes:
        bare, bare_ann = make_scene(ann["seed"], ann["size"], draw_objects=False)
        assert bare_ann["scene"] == ann["scene"], f"{ann['image']}: not the scene of seed {ann['seed']}"
        images = {"drawn": data.preprocess_image(data.load_image(data_dir / "images" / ann["image"]), size),
                  "bare": data.preprocess_image(bare, size)}  # (3, S, S) each
        for question, (prompt, answers) in questions.items():
            for kind, image in images.items():
                best = int(answer_logprobs(model, tokenizer, prompt, answers, image).argmax())
                right[question][kind] += SCENE_CLASSES[best] == ann["scene"]
    return {"scenes": len(scenes),
            **{question: {kind: n / max(len(scenes), 1) for kind, n in counts.items()} for question, counts in right.items()}}


def ground_probes(model: GeoChat, data_dir: Path, train_anns, test_anns) -> dict:
    """Balanced accuracy of one-against-the-rest probes for each ground on the mean-pooled tower and projector features."""
    tr_t, tr_p = features(model, data_dir, train_anns)
    te_t, te_p = features(model, data_dir, test_anns)
    out = {}
    for name, (tr, te) in {"tower": (tr_t, te_t), "projector": (tr_p, te_p)}.items():
        out[name] = {ground: fit_probe(tr.mean(1), torch.tensor([float(a["scene"] == ground) for a in train_anns]),
                                       te.mean(1), torch.tensor([float(a["scene"] == ground) for a in test_anns]))
                     for ground in SCENE_CLASSES}
    return out


def print_ground_report(report: dict, as_json: bool):
    """Measurement 6 as text (or JSON)."""
    if as_json:
        print(json.dumps(report, indent=1))
        return
    choice = report["choice"]
    print(f"the ground named ({choice['scenes']} held-out scenes with objects; as drawn | without the objects)")
    for question in ("scene question", "description"):
        print(f"  {question:15s} {choice[question]['drawn']:6.3f} | {choice[question]['bare']:6.3f}")
    for part, row in report["probes"].items():
        print(f"  probe {part:9s} " + "  ".join(f"{ground}={v:.3f}" for ground, v in row.items()))


def refer_landing(answer_rows: list[dict], anns: list[dict]) -> dict:
    """Where single-object [refer] answers' first boxes land, by the scene's number of objects: "target" overlaps
    the asked object, "other" only another object, "nothing" neither (overlap: IoU above 0.05)."""
    by_image = {a["image"]: a for a in anns}
    out = {}
    for row in answer_rows:
        if row["type"] != "ref":
            continue
        if row["image"] not in by_image:
            raise ValueError(f"the [refer] answers name {row['image']}, which is not among the held-out annotations of --data")
        ann = by_image[row["image"]]
        counts = out.setdefault(str(len(ann["objects"])), {"target": 0, "other": 0, "nothing": 0, "no box": 0})
        found = parse_boxes(row["answer"])
        if not found:
            counts["no box"] += 1
            continue
        answer = box_polygon_grid(found[0])
        overlap = [polygon_iou(answer, box_polygon_grid(Box(*o["grid"]))) > 0.05 for o in ann["objects"]]
        target = any(overlap[i] for i in row["obj_ids"])
        counts["target" if target else "other" if any(overlap) else "nothing"] += 1
    return dict(sorted(out.items()))


def refer_box_shape(answer_rows: list[dict], anns: list[dict]) -> dict:
    """How good the single-object [refer] boxes that land on their target are (IoU above 0.05), per class: their
    acc@0.5, acc@0.5 with the true angle put in place of the answer's (what reading the angle would add), the mean
    distance of their centres from the target's (grid units); and how many distinct angles all the answers use."""
    by_image = {a["image"]: a for a in anns}
    per_class, angles = {}, set()
    for row in answer_rows:
        found = parse_boxes(row["answer"]) if row["type"] == "ref" else []
        if not found:
            continue
        answer, truth = found[0], Box(*by_image[row["image"]]["objects"][row["obj_ids"][0]]["grid"])
        angles.add(answer.angle)
        iou = polygon_iou(box_polygon_grid(answer), box_polygon_grid(truth))
        if iou <= 0.05:
            continue
        turned = Box(answer.x1, answer.y1, answer.x2, answer.y2, truth.angle)
        stats = per_class.setdefault(by_image[row["image"]]["objects"][row["obj_ids"][0]]["class"],
                                     {"on target": 0, "acc@0.5": 0, "acc@0.5 true angle": 0, "centre error": 0.0})
        stats["on target"] += 1
        stats["acc@0.5"] += iou >= 0.5
        stats["acc@0.5 true angle"] += polygon_iou(box_polygon_grid(turned), box_polygon_grid(truth)) >= 0.5
        stats["centre error"] += math.dist(((answer.x1 + answer.x2) / 2, (answer.y1 + answer.y2) / 2),
                                           ((truth.x1 + truth.x2) / 2, (truth.y1 + truth.y2) / 2))
    for stats in per_class.values():
        n = stats["on target"]
        stats.update({k: round(stats[k] / n, 3) for k in ("acc@0.5", "acc@0.5 true angle", "centre error")})
    return {"by class": dict(sorted(per_class.items())), "distinct angles": len(angles)}


def print_class_report(report: dict, as_json: bool):
    """Measurement 5 as text (or JSON)."""
    if as_json:
        print(json.dumps(report, indent=1))
        return
    pres = report["presence"]
    print(f"answers by class asked ({pres['scenes']} held-out scenes with objects)")
    print(f"  presence: within-scene AUC {pres['within_scene_auc']:.3f} (0.5 = the class is ignored); margin sd over "
          f"the classes of a scene {pres['margin_sd_over_classes']:.3f}, over scenes {pres['margin_sd_over_scenes']:.3f}")
    print("  answer position, probes per decoder layer (balanced accuracy): class asked "
          + " ".join(f"{row['class asked']:.2f}" for row in pres["answer_position_probes"]) + "; class present "
          + " ".join(f"{row['class present']:.2f}" for row in pres["answer_position_probes"]))
    for n, counts in report.get("refer", {}).items():
        print(f"  [refer] single objects, scenes of {n} object(s): " + ", ".join(f"{k} {v}" for k, v in counts.items())
              + f" (ignoring the class: target {1 / int(n):.0%})")
    if "refer boxes" in report:
        shape = report["refer boxes"]
        print(f"  [refer] boxes on their target, by class ({shape['distinct angles']} distinct angles in all answers):")
        for cls, stats in shape["by class"].items():
            print(f"    {cls:13s} " + ", ".join(f"{k} {v}" for k, v in stats.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a trained Baby GeoChat directory")
    p.add_argument("--data", type=Path, required=True, help="the synthetic dataset it was trained on (synthetic/prepare.py scenes)")
    p.add_argument("--out", type=Path, required=True, help="directory for the question and answer files")
    p.add_argument("--n-accuracy", type=int, default=300, help="scenes per split for the train/held-out accuracy")
    p.add_argument("--n-probe", type=int, default=1500, help="training scenes the probes are fitted on (tested on held-out)")
    p.add_argument("--skip-accuracy", action="store_true", help="probes and gradients only")
    p.add_argument("--class-only", action="store_true", help="only measurement 5 (whether answers follow the class asked)")
    p.add_argument("--ground-only", action="store_true", help="only measurement 6 (where the ground it names comes from)")
    p.add_argument("--refer-answers", type=Path,
                   help="held-out [refer] answers (eval.py run --bench referring) for measurement 5; by default the "
                        "held-out answers of measurement 1, when it runs")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    for path in (args.checkpoint / "config.json", args.data / "annotations.jsonl", args.data / "train.json",
                 *([args.refer_answers] if args.refer_answers else [])):
        if not path.is_file():
            print(f"{path}: not found", file=sys.stderr)
            return 2
    torch.manual_seed(0)
    report = {}
    refer_answers = args.refer_answers
    if not (args.skip_accuracy or args.class_only or args.ground_only):
        report["accuracy"] = {
            split: bench_accuracy(args.checkpoint, args.data, read_annotations(args.data, split, args.n_accuracy),
                                  args.out, split)
            for split in ("train", "test")}
        refer_answers = refer_answers or args.out / "test_referring_answers.jsonl"
    model = GeoChat.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    tokenizer = data.Tokenizer(args.checkpoint / "tokenizer.model")
    all_test_anns = read_annotations(args.data, "test", -1)
    test_anns = all_test_anns[:300]
    train_anns = read_annotations(args.data, "train", args.n_probe)
    if args.ground_only:
        print_ground_report({"choice": ground_choice(model, tokenizer, args.data, test_anns),
                             "probes": ground_probes(model, args.data, train_anns, test_anns)}, args.json)
        return 0
    report["class asked"] = {"presence": presence_by_class(model, tokenizer, args.data, test_anns[:100])}
    if refer_answers is not None:
        try:
            rows = bench_eval.read_jsonl(str(refer_answers))
            report["class asked"]["refer"] = refer_landing(rows, all_test_anns)
            report["class asked"]["refer boxes"] = refer_box_shape(rows, all_test_anns)
        except bench_eval.InputError as e:
            print(e, file=sys.stderr)
            return 2
        except (ValueError, KeyError) as e:
            print(f"{refer_answers}: not [refer] answers of this dataset ({e})", file=sys.stderr)
            return 2
    if args.class_only:
        print_class_report(report["class asked"], args.json)
        return 0
    report["ground"] = {"choice": ground_choice(model, tokenizer, args.data, test_anns),
                        "probes": ground_probes(model, args.data, train_anns, test_anns)}
    report["probes"] = {"trained": probes(model, args.data, train_anns, test_anns)}
    report["gradients"] = {"trained": gradient_norms(model, tokenizer, args.data)}
    report["image attention"] = {"trained": image_attention(model, tokenizer, args.data, test_anns[:120])}
    fresh = GeoChat(model.cfg)
    init_weights(fresh, seed=0)
    fresh.eval()
    report["probes"]["fresh init"] = probes(fresh, args.data, train_anns, test_anns)
    report["gradients"]["fresh init"] = gradient_norms(fresh, tokenizer, args.data)
    report["image attention"]["fresh init"] = image_attention(fresh, tokenizer, args.data, test_anns[:120])
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    if "accuracy" in report:
        print("accuracy (train scenes | held-out scenes)")
        tr, te = report["accuracy"]["train"], report["accuracy"]["test"]
        rows = [(f"vqa {c}", tr["vqa"]["per_category"][c]["accuracy"], te["vqa"]["per_category"][c]["accuracy"])
                for c in sorted(tr["vqa"]["per_category"])]
        rows += [(f"referring {k}", tr["referring"][k], te["referring"][k]) for k in ("acc@0.5", "mean_iou_single")]
        for name, a, b in rows:
            print(f"  {name:28s} {a:6.3f} | {b:6.3f}")
    print("linear probes on held-out scenes: balanced accuracy (0.5 = chance); angle error in degrees (22.5 = chance)")
    for init, parts in report["probes"].items():
        for part, row in parts.items():
            print(f"  {init:10s} {part:9s} " + "  ".join(f"{k}={v:.3f}" for k, v in row.items()))
    print("attention of the answer position, per decoder layer (one value a head)")
    for init, att in report["image attention"].items():
        for key, fmt in (("share", "{:.2f}"), ("on_objects", "{:.2f}"), ("spread", "{:.0f}")):
            print(f"  {init:10s} {key:10s} " + " | ".join(" ".join(fmt.format(v) for v in heads) for heads in att[key]))
        print(f"  {init:10s} object patches: {att['object_patches']:.2f} of the image tokens")
    print_class_report(report["class asked"], False)
    print_ground_report(report["ground"], False)
    print("gradient norms on one batch (loss per labelled token)")
    for init, parts in report["gradients"].items():
        print(f"  {init:10s} " + "  ".join(f"{k}: grad {v['grad']:.3g} weight {v['weight']:.3g}" for k, v in parts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
