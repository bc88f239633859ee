"""Pretrain Baby GeoChat's vision tower on the synthetic world, as CLIP is pretrained before GeoChat.

    python synthetic/pretrain_tower.py --config baby --out DIR [--n-train 8000] [--seed 0] [--steps 800]
                                       [--schedule constant|cosine] [--angle-weight W] [--wrap-angle] [--count-weight W]
                                       [--axis-weight W] [--per-object]
    python synthetic/pretrain_tower.py --from-checkpoint checkpoints/baby-geochat --out DIR

GeoChat starts from a pretrained CLIP tower and keeps it frozen; a tower trained from scratch through the
decoder's answers never becomes readable (README, "Why it does not find objects"). This script gives the
baby the same start: the tower alone learns, for every patch of its selected layer, which object class
covers the patch (`scenes.cell_objects`, the grid task's labels) and that object's box in GeoChat's numbers
(x1, y1, x2, y2 on the 0-100 grid and the angle), through a linear head that is then thrown away. The box
is learned twice: as five regressed numbers, and as five 101-way choices (soft targets around the true
value), so that each value is also place-coded in the features, the form in which the decoder must emit it
(one token per value with `prepare.py tokenizer --box-pieces`). `--wrap-angle` makes the angle's choice wrap around
at 90 (89 and 0 are one edge direction) and `--angle-weight W` weighs it W times a corner value's (tried, not in
the recipe: README, the attempts table's row "a tower that reads the angle").
`--per-object` weighs every object the same in the box terms, where by default every patch does (a plane covers
about seven patches, a vehicle one or none, so the default teaches the boxes of planes most and of vehicles least);
`--axis-weight W` also teaches each object patch its object's axis modulo 180 as (cos 2φ, sin 2φ), the heading that
GeoChat's numbers split between the angle and which side is the longer. The held-out metrics include
`object_box_iou50` (and per class): how often the box read off the head's value choices, over the patches an object
covers, passes IoU 0.5, the box a decoder that copies the features would give.
With `--count-weight W` every patch also learns, through a second linear head, how many objects of each class
the whole scene holds (0-3, a 4-way choice per class): presence and count become a feature of every image token,
where without it the decoder has to find and tell apart the class's patches itself.
The scenes are the dataset's own training scenes (the same seeds as `prepare.py scenes --seed`), rendered
in memory. DIR becomes an HF `CLIPVisionModel` directory (config.json + model.safetensors) that
`train.py --config baby --vision-tower DIR` starts from, frozen like the reference's CLIP.
`--from-checkpoint` trains nothing: it writes the tower of a trained checkpoint (the baby's recipe keeps it frozen,
so the shipped baby's is the tower its recipe pretrained) as such a directory, to start new stages from it.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import preprocess_image  # noqa: E402
from geochat import CLIP_KEYS, GeoChat, GeoChatConfig, unmap_keys  # noqa: E402
from boxes import BOX_VALUE_PIECES, Box, box_polygon_grid, polygon_iou  # noqa: E402
from synthetic.prepare import UsageError, _writable_dir, image_seed  # noqa: E402
from synthetic.scenes import N_OBJECTS_WEIGHTS, OBJECT_CLASSES, cell_objects, class_counts, make_scene  # noqa: E402
from train import UsageError as ConfigError, init_weights, load_config, lr_at  # noqa: E402
from vit import VisionTower  # noqa: E402

GROUND_WEIGHT = 0.2  # most patches are ground: their class loss counts this much
BOX_WEIGHT = 5.0     # the box regression's weight against the class loss
ANGLE_RANGE = 90.0   # GeoChat's angles lie in [0, 90)
BOX_VALUES = len(BOX_VALUE_PIECES)  # a box value as a choice, one per tokenizer piece: 0-100 on the grid, 0-89 for the angle
VALUE_SIGMA = 1.5    # the choice's soft target: a Gaussian of this many values around the true one
VALUE_WEIGHT = 1.0   # its weight against the class loss
N_CLASSES = 1 + len(OBJECT_CLASSES)  # ground first
HEAD_OUTPUTS = N_CLASSES + 5 + 5 * BOX_VALUES  # class logits, regressed box, the five values' logits
COUNT_VALUES = len(N_OBJECTS_WEIGHTS)  # a class's count in a scene as a choice: 0 to the most objects a scene holds
COUNT_OUTPUTS = len(OBJECT_CLASSES) * COUNT_VALUES  # the count head: each class's count logits
VALUE_SCALE = torch.tensor([100.0, 100.0, 100.0, 100.0, ANGLE_RANGE])  # normalised box -> integer values


def render(seed: int, split: int, n: int, size: int, grid: int, object_scale: float = 1.0):
    """n scenes of one split: images (n, 3, size, size) float16, cell classes (n, grid*grid) (0 = ground),
    cell boxes (n, grid*grid, 5): the covering object's x1, y1, x2, y2 / 100 and angle / 90 (0 on ground),
    the scenes' annotations, and each scene's count of every class (n, len(OBJECT_CLASSES))."""
    images = torch.empty(n, 3, size, size, dtype=torch.float16)
    classes = torch.zeros(n, grid * grid, dtype=torch.long)
    boxes = torch.zeros(n, grid * grid, 5)
    counts = torch.zeros(n, len(OBJECT_CLASSES), dtype=torch.long)
    anns = []
    for i in tqdm(range(n), desc=f"split {split} scenes", unit="img", leave=False):
        img, ann = make_scene(image_seed(seed, split, i), size, object_scale=object_scale)
        images[i] = preprocess_image(img, size).to(torch.float16)
        anns.append(ann)
        counts[i] = torch.tensor(list(class_counts(ann).values()))
        for cell, k in enumerate(cell_objects(ann, grid)):
            if k >= 0:
                obj = ann["objects"][k]
                classes[i, cell] = OBJECT_CLASSES.index(obj["class"]) + 1
                x1, y1, x2, y2, theta = obj["grid"]
                boxes[i, cell] = torch.tensor([x1 / 100, y1 / 100, x2 / 100, y2 / 100, theta / ANGLE_RANGE])
    return images, classes, boxes, anns, counts


def value_targets(boxes: torch.Tensor, wrap_angle: bool = False) -> torch.Tensor:
    """Normalised boxes (n, 5) -> soft targets (n, 5, BOX_VALUES) around each integer value. With wrap_angle the
    angle's wraps around at 90 (89 and 0 are one edge direction: a box turned by 90 is itself with its sides swapped)
    and puts nothing on 90-100, which are no angles."""
    values = (boxes * VALUE_SCALE).round()  # (n, 5)
    grid = torch.arange(BOX_VALUES, dtype=boxes.dtype)
    distance = (grid - values[..., None]).abs()  # (n, 5, BOX_VALUES)
    if wrap_angle:
        angle_distance = torch.minimum(distance[:, 4], ANGLE_RANGE - distance[:, 4])  # (n, BOX_VALUES)
        angle_distance[:, int(ANGLE_RANGE):] = float("inf")
        distance = torch.cat([distance[:, :4], angle_distance[:, None]], 1)
    target = torch.exp(-0.5 * (distance / VALUE_SIGMA) ** 2)  # (n, 5, BOX_VALUES)
    return target / target.sum(-1, keepdim=True)


def angle_error_deg(angle: torch.Tensor, truth: torch.Tensor, period: float = ANGLE_RANGE) -> torch.Tensor:
    """Elementwise error in degrees modulo `period` between angles: 90 for box angles (a box turned by 90 is itself
    with its sides swapped), 180 for headings (axis_error_deg)."""
    miss = (angle - truth).abs() % period
    return torch.minimum(miss, period - miss)


def patch_loss(head, feats, classes, boxes, angle_weight=1.0, wrap_angle=False, patch_weights=None):
    """Class cross-entropy (ground down-weighted), plus on the object patches the L1 box error and the
    cross-entropy of each box value's choice (value_targets), the angle's weighted by angle_weight. The box terms
    are means over the object patches, or weighted means with patch_weights (B, P) (object_patch_weights)."""
    out = head(feats)  # (B, P, HEAD_OUTPUTS)
    weight = torch.ones(N_CLASSES)
    weight[0] = GROUND_WEIGHT
    cls_loss = F.cross_entropy(out[..., :N_CLASSES].flatten(0, 1), classes.flatten(), weight=weight)
    on = classes > 0
    if not on.any():
        return cls_loss + out.sum() * 0
    obj = out[on]  # (n, HEAD_OUTPUTS)
    box_loss = (obj[:, N_CLASSES:N_CLASSES + 5] - boxes[on]).abs()  # (n, 5)
    logits = obj[:, N_CLASSES + 5:].view(-1, 5, BOX_VALUES)  # (n, 5, BOX_VALUES)
    value_loss = -(value_targets(boxes[on], wrap_angle) * logits.log_softmax(-1)).sum(-1)  # (n, 5)
    if angle_weight != 1.0:
        value_loss = value_loss * torch.tensor([1.0, 1.0, 1.0, 1.0, angle_weight])
    if patch_weights is None:
        box_loss, value_loss = box_loss.mean(), value_loss.mean()
    else:
        w = patch_weights[on] / patch_weights[on].sum()  # (n,)
        box_loss, value_loss = (box_loss.mean(-1) * w).sum(), (value_loss.mean(-1) * w).sum()
    return cls_loss + BOX_WEIGHT * box_loss + VALUE_WEIGHT * value_loss


def object_patch_weights(classes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(n, P) weights that give every object the same weight in the box terms whatever its size: 1 / the number of
    its scene's patches that carry its box (a plane covers about seven, a vehicle one); 0 on ground."""
    same = (boxes[:, :, None, :] == boxes[:, None, :, :]).all(-1) & (classes[:, :, None] > 0)  # (n, P, P)
    patches = same.sum(-1)  # (n, P) patches of each patch's object (two objects never share a box: they never overlap)
    return torch.where(classes > 0, 1.0 / patches.clamp_min(1), torch.zeros(()))


def axis_targets(anns, grid: int):
    """Each patch's object axis (n, grid*grid, 2): (cos 2φ, sin 2φ) of the covering object's direction φ modulo 180
    (a long object's heading, continuous where GeoChat's numbers jump at 90: a box turned 90 is the same box with its
    sides swapped), and a mask (n, grid*grid) of the patches that have one (ground and round storage tanks do not)."""
    axes = torch.zeros(len(anns), grid * grid, 2)
    turned = torch.zeros(len(anns), grid * grid, dtype=torch.bool)
    for i, ann in enumerate(anns):
        for cell, k in enumerate(cell_objects(ann, grid)):
            if k >= 0 and ann["objects"][k]["class"] != "storage tank":
                phi = math.radians(2 * (ann["objects"][k]["direction"] % 180))
                axes[i, cell] = torch.tensor([math.cos(phi), math.sin(phi)])
                turned[i, cell] = True
    return axes, turned


def axis_loss(axis_head, feats, axes, turned):
    """Mean squared error of each turned patch's axis (axis_targets); 0 (connected to the graph) without one."""
    out = axis_head(feats)  # (B, P, 2)
    if not turned.any():
        return out.sum() * 0
    return (out[turned] - axes[turned]).pow(2).sum(-1).mean()


def axis_error_deg(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Elementwise error in degrees modulo 180 between axes given as (cos 2φ, sin 2φ) rows."""
    heading = lambda axis: torch.rad2deg(torch.atan2(axis[:, 1], axis[:, 0])) / 2  # (n,) φ in (-90, 90]
    return angle_error_deg(heading(pred), heading(truth), period=180.0)


def object_box_hits(value_logits: torch.Tensor, anns, grid: int) -> dict:
    """Per object class, [objects, objects whose box passes rotated IoU 0.5]: the box each held-out object gets from
    the head's value choices averaged over the patches it covers (its centre's patch if it covers none), as the
    decoder would read it off the features. value_logits (n, grid*grid, 5, BOX_VALUES)."""
    hits = {cls: [0, 0] for cls in OBJECT_CLASSES}
    step = 100.0 / grid
    for i, ann in enumerate(anns):
        cells = cell_objects(ann, grid)
        for k, obj in enumerate(ann["objects"]):
            mine = [c for c, owner in enumerate(cells) if owner == k]
            if not mine:
                x1, y1, x2, y2, _ = obj["grid"]
                mine = [min(grid - 1, int((y1 + y2) / 2 // step)) * grid + min(grid - 1, int((x1 + x2) / 2 // step))]
            values = value_logits[i, mine].mean(0).argmax(-1).tolist()  # (5,) x1, y1, x2, y2, angle
            iou = polygon_iou(box_polygon_grid(Box(*values)), box_polygon_grid(Box(*obj["grid"])))
            hits[obj["class"]][0] += 1
            hits[obj["class"]][1] += iou >= 0.5
    return hits


def count_loss(count_head, feats, counts):
    """Every patch's cross-entropy of its scene's count of each class (counts (B, len(OBJECT_CLASSES)))."""
    logits = count_head(feats).unflatten(-1, (len(OBJECT_CLASSES), COUNT_VALUES))  # (B, P, classes, COUNT_VALUES)
    target = counts[:, None, :].expand(-1, feats.shape[1], -1)  # (B, P, classes)
    return F.cross_entropy(logits.flatten(0, 2), target.flatten())


@torch.no_grad()
def evaluate(tower, head, images, classes, boxes, batch=64, count_head=None, counts=None, anns=None, axis_head=None):
    """Held-out: class accuracy on object patches and on ground patches; on object patches, the mean error in grid
    units of the regressed box and of the chosen box values (x1, y1, x2, y2), and of the chosen angle in degrees
    (modulo 90, storage tanks left out). With a count head, also how often a
    single patch's count choice is right (each class of each scene, every patch) and how often its presence is.
    With the scenes' annotations, the share of objects whose box from the value choices passes IoU 0.5, in all and
    per class (object_box_hits), and with an axis head too, its mean error in degrees modulo 180 (axis_targets)."""
    preds, regs, value_logits, count_picks, axis_preds = [], [], [], [], []
    for a in range(0, len(images), batch):
        feats = tower(images[a:a + batch].float())  # (b, P, width)
        out = head(feats)  # (b, P, HEAD_OUTPUTS)
        if count_head is not None:
            count_picks.append(count_head(feats).unflatten(-1, (len(OBJECT_CLASSES), COUNT_VALUES)).argmax(-1))
        if axis_head is not None:
            axis_preds.append(axis_head(feats))  # (b, P, 2)
        preds.append(out[..., :N_CLASSES].argmax(-1))
        regs.append(out[..., N_CLASSES:N_CLASSES + 5])
        value_logits.append(out[..., N_CLASSES + 5:].unflatten(-1, (5, BOX_VALUES)))  # (b, P, 5, BOX_VALUES)
    pred, reg, logits = torch.cat(preds), torch.cat(regs), torch.cat(value_logits)
    pick = logits.argmax(-1)  # (n, P, 5)
    on = classes > 0
    truth = (boxes[on] * VALUE_SCALE).round()
    metrics = {"object_patch_acc": (pred[on] == classes[on]).float().mean().item(),
               "ground_patch_acc": (pred[~on] == 0).float().mean().item(),
               "box_error_grid": ((reg[on][:, :4] - boxes[on][:, :4]).abs().mean() * 100).item(),
               "box_value_error_grid": (pick[on][:, :4] - truth[:, :4]).abs().float().mean().item()}
    turned = on & (classes != OBJECT_CLASSES.index("storage tank") + 1)  # a round tank's angle is always 0
    if turned.any():
        truth_angle = (boxes[turned][:, 4] * ANGLE_RANGE).round()
        metrics["angle_value_error_deg"] = angle_error_deg(pick[turned][:, 4], truth_angle).mean().item()
    if count_head is not None:
        count_pick, truth_counts = torch.cat(count_picks), counts[:, None, :]  # (n, P, classes), (n, 1, classes)
        metrics["patch_count_acc"] = (count_pick == truth_counts).float().mean().item()
        metrics["patch_presence_acc"] = ((count_pick > 0) == (truth_counts > 0)).float().mean().item()
    grid = math.isqrt(classes.shape[1])
    if anns is not None:
        hits = object_box_hits(logits, anns, grid)
        metrics["object_box_iou50"] = sum(h for _, h in hits.values()) / max(1, sum(n for n, _ in hits.values()))
        metrics.update({f"object_box_iou50_{cls.replace(' ', '_')}": h / n for cls, (n, h) in hits.items() if n})
    if axis_head is not None and anns is not None:
        axes, turned = axis_targets(anns, grid)
        metrics["axis_error_deg"] = axis_error_deg(torch.cat(axis_preds)[turned], axes[turned]).mean().item()
    return metrics


def save_clip_dir(tower: VisionTower, out: Path):
    """Write the tower as an HF CLIPVisionModel directory. The blocks after the selected layer, which GeoChat never
    runs, are written as identity blocks (zero output projections) so that HF finds every key it expects."""
    from safetensors.torch import save_file

    cfg = tower.cfg
    state = {"vision." + k: v.detach().float().contiguous() for k, v in tower.state_dict().items()}
    for layer in range(len(tower.blocks), cfg.n_layers):
        for name, value in tower.blocks[0].state_dict().items():
            zero = name.startswith(("attn.o_proj.", "mlp.fc2.")) or name.endswith(".bias")
            state[f"vision.blocks.{layer}.{name}"] = torch.zeros_like(value) if zero else value.detach().float().clone()
    stored = unmap_keys(state, [(k, v) for k, v in CLIP_KEYS if k.startswith("vision_model.")])
    tensors = {stored[k]: v for k, v in state.items()}
    tensors["vision_model.post_layernorm.weight"] = torch.ones(cfg.width)
    tensors["vision_model.post_layernorm.bias"] = torch.zeros(cfg.width)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")


def tower_lr(step, steps, peak, schedule):
    """The lr of step `step` (0-based): linear warmup over the first 5% of the steps, then `peak` held
    ("constant", the shipped baby's tower) or cosine to 0 (train.py's schedule, "cosine")."""
    warmup = max(1, steps // 20)
    if schedule == "constant":
        return peak * min(1.0, (step + 1) / warmup)
    return lr_at(step + 1, steps + 1, warmup, peak)  # one step on: the first step trains at peak / warmup, not 0


def fit(tower, head, images, classes, boxes, steps, batch_size, lr, progress=True, schedule="constant",
        count_head=None, counts=None, count_weight=0.0, angle_weight=1.0, wrap_angle=False,
        axis_head=None, axes=None, turned=None, axis_weight=0.0, patch_weights=None):
    """AdamW on patch_loss (plus count_weight x count_loss with a count head, axis_weight x axis_loss with an axis
    head; box terms weighted by patch_weights when given) over random batches (torch's global RNG), lr from tower_lr."""
    heads = list(head.parameters()) + (list(count_head.parameters()) if count_head is not None else [])
    heads += list(axis_head.parameters()) if axis_head is not None else []
    opt = torch.optim.AdamW(list(tower.parameters()) + heads, lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="tower", unit="step", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = tower_lr(step, steps, lr, schedule)
        idx = torch.randint(0, len(images), (batch_size,))
        feats = tower(images[idx].float())  # (batch, P, width)
        weights = patch_weights[idx] if patch_weights is not None else None
        loss = patch_loss(head, feats, classes[idx], boxes[idx], angle_weight, wrap_angle, weights)
        if count_head is not None:
            loss = loss + count_weight * count_loss(count_head, feats, counts[idx])
        if axis_head is not None:
            loss = loss + axis_weight * axis_loss(axis_head, feats, axes[idx], turned[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def pretrain(args, cfg: GeoChatConfig) -> dict:
    """Train cfg's tower, write it to args.out, return the held-out metrics."""
    torch.manual_seed(args.seed)
    model = GeoChat(cfg)
    init_weights(model, args.seed)  # the same start as a scratch tower in train.py (sine-cosine position rows)
    tower = model.vision.float().train()
    head = torch.nn.Linear(cfg.vision.width, HEAD_OUTPUTS)
    # made only when asked for, so that a tower without counts draws the same random numbers as before the option
    count_head = torch.nn.Linear(cfg.vision.width, COUNT_OUTPUTS) if args.count_weight > 0 else None
    axis_head = torch.nn.Linear(cfg.vision.width, 2) if args.axis_weight > 0 else None
    train = render(args.data_seed, 0, args.n_train, cfg.image_size, tower.grid, args.object_scale)
    test = render(args.data_seed, 1, args.n_test, cfg.image_size, tower.grid, args.object_scale)
    axes, turned = axis_targets(train[3], tower.grid) if axis_head is not None else (None, None)
    start = time.time()
    fit(tower, head, *train[:3], args.steps, args.batch_size, args.lr, schedule=args.schedule,
        count_head=count_head, counts=train[4], count_weight=args.count_weight, angle_weight=args.angle_weight,
        wrap_angle=args.wrap_angle, axis_head=axis_head, axes=axes, turned=turned, axis_weight=args.axis_weight,
        patch_weights=object_patch_weights(train[1], train[2]) if args.per_object else None)
    metrics = {"steps": args.steps, "schedule": args.schedule, "seconds": round(time.time() - start, 1),
               **({"angle_weight": args.angle_weight} if args.angle_weight != 1.0 else {}),
               **({"wrap_angle": True} if args.wrap_angle else {}),
               **({"count_weight": args.count_weight} if count_head is not None else {}),
               **({"axis_weight": args.axis_weight} if axis_head is not None else {}),
               **({"per_object": True} if args.per_object else {}),
               **evaluate(tower, head, *test[:3], count_head=count_head, counts=test[4], anns=test[3],
                          axis_head=axis_head)}
    save_clip_dir(tower, Path(args.out))
    (Path(args.out) / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def tower_from_checkpoint(checkpoint: Path, out: Path) -> dict:
    """Write a trained checkpoint's vision tower to `out` as a CLIP directory; return what pretrain_metrics.json records."""
    model = GeoChat.from_pretrained(checkpoint, dtype=torch.float32)  # before --out is made: a bad checkpoint leaves nothing
    save_clip_dir(model.vision, _writable_dir(out, "--out"))
    metrics = {"from_checkpoint": str(checkpoint)}
    (out / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def build_parser():
    """The command line."""
    p = argparse.ArgumentParser(prog="synthetic/pretrain_tower.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="baby", help="a named GeoChat config or our config.json (its vision tower is trained)")
    p.add_argument("--out", required=True, help="CLIP directory to write (created if missing)")
    p.add_argument("--data-seed", type=int, default=0, help="the dataset seed of `prepare.py scenes`: its training scenes are used")
    p.add_argument("--n-train", type=int, default=8000, help="training scenes (the first n of the dataset's)")
    p.add_argument("--n-test", type=int, default=300, help="held-out scenes for the reported metrics")
    p.add_argument("--object-scale", type=float, default=1.0, help="objects' sizes times this, as in prepare.py scenes")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="scenes per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (linear warmup over 5%% of the steps)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="after the warmup: hold the peak lr (the shipped baby's tower) or cosine to 0")
    p.add_argument("--count-weight", type=float, default=0.0,
                   help="also learn, at every patch, the scene's count of each class, with this weight (0: not learned)")
    p.add_argument("--angle-weight", type=float, default=1.0,
                   help="the weight of the box angle's choice against each corner value's (1: the same)")
    p.add_argument("--wrap-angle", action="store_true",
                   help="the angle's soft target wraps around at 90 (89 and 0 are one edge direction)")
    p.add_argument("--axis-weight", type=float, default=0.0,
                   help="also learn, at every object patch, its axis modulo 180 as (cos 2φ, sin 2φ), with this weight "
                        "(0: not learned)")
    p.add_argument("--per-object", action="store_true",
                   help="every object weighs the same in the box terms (not every patch: a plane covers about seven "
                        "patches, a vehicle one)")
    p.add_argument("--seed", type=int, default=0, help="init and batch-order seed")
    p.add_argument("--from-checkpoint", type=Path, default=None,
                   help="train nothing: write this trained checkpoint's tower to --out (the training flags are unused)")
    return p


def main(argv=None):
    """Entry point: bad input is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        for flag, value, low in (("--n-train", args.n_train, 1), ("--n-test", args.n_test, 1), ("--steps", args.steps, 1),
                                 ("--batch-size", args.batch_size, 1)):
            if value < low:
                raise UsageError(f"{flag} must be >= {low}, got {value}")
        if not 0.5 <= args.object_scale <= 4:
            raise UsageError(f"--object-scale must be in [0.5, 4], got {args.object_scale}")
        if not args.lr > 0:
            raise UsageError(f"--lr must be > 0, got {args.lr}")
        if not args.angle_weight >= 0:
            raise UsageError(f"--angle-weight must be >= 0, got {args.angle_weight}")
        if not args.count_weight >= 0:
            raise UsageError(f"--count-weight must be >= 0, got {args.count_weight}")
        if not args.axis_weight >= 0:
            raise UsageError(f"--axis-weight must be >= 0, got {args.axis_weight}")
        if args.from_checkpoint:
            metrics = tower_from_checkpoint(args.from_checkpoint, Path(args.out))
        else:
            cfg = load_config(args.config)
            _writable_dir(Path(args.out), "--out")
    except (UsageError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not args.from_checkpoint:
        metrics = pretrain(args, cfg)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
