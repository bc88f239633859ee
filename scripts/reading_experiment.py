"""Can Baby GeoChat's decoder learn to read its image tokens? Presence questions without the prompt, four starts.

    python scripts/reading_experiment.py [--steps 300] [--n-train 4000] [--pretrain-steps 400] [--json out.json]

Each row trains the baby architecture (train.init_weights) on one question, "is there a <class>?", stripped to
[BOS] + 64 image tokens + one class token -> "Yes"/"No" (logits of two vocabulary rows), and reports held-out
accuracy every 50 steps:
- scratch:           the tower from scratch, trained with the decoder (what train.py --config did);
- symbolic:          the true class of each patch (scenes.cell_objects) as a token embedding in place of the
                     image tokens: the decoder alone, with perfect and discrete inputs;
- pretrained:        a tower pretrained by synthetic/pretrain_tower.py's objective first, then trained on;
- pretrained-frozen: the same tower, frozen (the reference's recipe for CLIP);
- frozen+prompt:     pretrained-frozen with 40 fixed tokens before the image and 20 after the class token, as many
                     as the chat template and the question put there (the answer must be carried to the end).
This is the experiment behind the README's "Why it does not find objects".
"""

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from geochat import GeoChat, GeoChatConfig  # noqa: E402
from synthetic.pretrain_tower import HEAD_OUTPUTS, fit, render  # noqa: E402
from synthetic.scenes import OBJECT_CLASSES, _presence  # noqa: E402
from train import init_weights  # noqa: E402

YES, NO, CLASS0, CELL0, FILLER0 = 20, 21, 10, 40, 100  # vocabulary rows standing in for the words
VARIANTS = ("scratch", "symbolic", "pretrained", "pretrained-frozen", "frozen+prompt")
PROMPT_TOKENS = (40, 20)  # frozen+prompt: fixed tokens before the image, after the class token


def questions(anns, rng):
    """One presence question per scene: (class index, 1 for yes)."""
    out = []
    for ann in anns:
        q, a = _presence(ann, rng)[:2]
        out.append((next(i for i, c in enumerate(OBJECT_CLASSES) if f" {c} " in q), int(a == "Yes")))
    return torch.tensor(out)  # (n, 2)


def answer_logits(model, images, classes, cells, variant):
    """(B, 2) logits of No, Yes after [BOS] (+ prompt) + image tokens (or the cells' class tokens) + the class token (+ prompt)."""
    emb = model.llm.embed_tokens
    B = images.shape[0]
    before, after = PROMPT_TOKENS if variant == "frozen+prompt" else (0, 0)
    filler = torch.arange(FILLER0, FILLER0 + before + after).expand(B, -1)
    image = emb(CELL0 + cells) if variant == "symbolic" else model.encode_images(images.float())  # (B, 64, dim)
    seq = torch.cat([emb(torch.ones(B, 1, dtype=torch.long)), emb(filler[:, :before]), image,
                     emb(CLASS0 + classes[:, None]), emb(filler[:, before:])], dim=1)  # (B, 1 + before + 64 + 1 + after, dim)
    return model.forward_embeds(seq)[:, -1, [NO, YES]]


def run(variant, cfg, train, test, args, log, pretrained: dict):
    """Train one variant; held-out accuracy every 50 steps. The pretrained tower is made once, kept in `pretrained`."""
    torch.manual_seed(args.seed)
    model = GeoChat(cfg)
    init_weights(model, args.seed)
    model.float().train()
    if variant not in ("scratch", "symbolic"):
        if not pretrained:
            head = torch.nn.Linear(cfg.vision.width, HEAD_OUTPUTS)
            fit(model.vision, head, *train[:3], args.pretrain_steps, args.batch_size, args.lr, progress=False)
            pretrained.update({k: v.clone() for k, v in model.vision.state_dict().items()})
        model.vision.load_state_dict(pretrained)
        torch.manual_seed(args.seed + 1)  # the same batches whichever variant pretrained the tower
    frozen = variant in ("pretrained-frozen", "frozen+prompt")
    params = [p for name, p in model.named_parameters() if not (frozen and name.startswith("vision."))]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)
    test_q = questions(test[3], random.Random(args.seed + 1))
    curve, start = [], time.time()
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, step / 20)
        idx = torch.randint(0, len(train[0]), (args.batch_size,))
        q = questions([train[3][i] for i in idx], rng)
        loss = F.cross_entropy(answer_logits(model, train[0][idx], q[:, 0], train[1][idx], variant), q[:, 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            with torch.no_grad():
                model.eval()
                pred = answer_logits(model, test[0], test_q[:, 0], test[1], variant).argmax(-1)
                model.train()
            curve.append((step, (pred == test_q[:, 1]).float().mean().item()))
            log(f"{variant:<18} step {step:>4}  held-out accuracy {curve[-1][1]:.3f}  ({time.time() - start:.0f} s)")
    return curve


def main(argv=None):
    """Run the variants and print one table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="baby", help="the GeoChat config whose architecture is trained")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=300, help="steps per variant")
    p.add_argument("--pretrain-steps", type=int, default=400, help="tower pretraining steps of the pretrained variants")
    p.add_argument("--n-train", type=int, default=4000, help="training scenes (dataset seed 0's first ones)")
    p.add_argument("--n-test", type=int, default=400, help="held-out scenes, one question each")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the curves here")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if not variants or any(v not in VARIANTS for v in variants):
        print(f"error: --variants {args.variants!r}: expected a subset of {','.join(VARIANTS)}", file=sys.stderr)
        sys.exit(2)
    cfg = GeoChatConfig.from_name(args.config)
    grid = cfg.image_size // cfg.vision.patch_size
    train = render(0, 0, args.n_train, cfg.image_size, grid)
    test = render(0, 1, args.n_test, cfg.image_size, grid)
    pretrained = {}
    curves = {v: run(v, cfg, train, test, args, lambda line: print(line, flush=True), pretrained) for v in variants}
    steps = [s for s, _ in next(iter(curves.values()))]
    print("\n| start | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for v, curve in curves.items():
        print(f"| {v} | " + " | ".join(f"{a:.1%}" for _, a in curve) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(curves, indent=2) + "\n")


if __name__ == "__main__":
    main()
