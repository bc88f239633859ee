"""Write the synthetic Baby GeoChat dataset and train its SentencePiece tokenizer.

    python synthetic/prepare.py scenes --out DIR [--n-train 20000] [--n-test 500] [--seed 0] [--size 128]
    python synthetic/prepare.py tokenizer --corpus DIR/corpus.txt --out DIR/tokenizer.model [--vocab-size 2000]

`scenes` writes images/, train.json and test.json (GeoChat_Instruct records), one GeoChat-Bench
question file per bench for the held-out split (named after eval.py's bench names),
annotations.jsonl (every object's exact box) and corpus.txt (the text the tokenizer learns from).
Everything is a function of --seed: the same command writes the same bytes, whatever --workers.
"""

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import sentencepiece
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from boxes import BOX_VALUE_PIECES  # noqa: E402
from data import FIXED_PROMPT_PHRASES, TEMPLATES  # noqa: E402
from eval import BENCHES  # noqa: E402
from synthetic.scenes import PRETEXT_TASKS, TASKS, bench_questions, instruct_records, make_scene  # noqa: E402

MIN_VOCAB_SIZE = 300  # 256 byte pieces + the special pieces + a few merges


class UsageError(Exception):
    """A bad command line: reported as one line, exit code 2."""


def image_seed(seed, split, index):
    """The scene seed of image `index` of split 0 (train) / 1 (test) for a dataset seed."""
    return int(np.random.SeedSequence([int(seed), int(split), int(index)]).generate_state(1)[0])


def _render_chunk(job):
    img_dir, split_name, split_id, seed, size, object_scale, indices = job
    anns = []
    for i in indices:
        name = "%s_%06d.png" % (split_name, i)
        img, ann = make_scene(image_seed(seed, split_id, i), size, object_scale=object_scale)
        img.save(Path(img_dir) / name, format="PNG", compress_level=1)
        ann["image"] = name
        anns.append(ann)
    return anns


def _render_split(img_dir, split_name, split_id, n, seed, size, workers, progress, object_scale=1.0):
    """Render n scenes of one split into img_dir; their annotations in index order."""
    chunk = max(16, min(256, -(-n // max(1, 4 * workers))))
    jobs = [(str(img_dir), split_name, split_id, seed, size, object_scale, list(range(a, min(n, a + chunk))))
            for a in range(0, n, chunk)]
    anns = []
    with tqdm(total=n, desc=f"{split_name} scenes", unit="img", disable=not progress or n == 0) as bar:
        if workers <= 1 or len(jobs) <= 1:
            results = map(_render_chunk, jobs)
            for result in results:
                anns.extend(result)
                bar.update(len(result))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for result in pool.map(_render_chunk, jobs):
                    anns.extend(result)
                    bar.update(len(result))
    return anns


def _corpus_lines(records, bench):
    yield from TEMPLATES.values()
    yield "USER: <image>"
    yield "ASSISTANT: </s>"
    for rec in records:
        for turn in rec["conversations"]:
            yield from (line for line in turn["value"].split("\n") if line)
    for rows in bench.values():
        for row in rows:
            for key in ("text", "question", "ground_truth"):
                if key in row:
                    yield from (line for line in str(row[key]).split("\n") if line)


def write_dataset(out_dir, n_train_images, n_test_images, seed=0, size=128, records_per_image=7,
                  multi_turn_prob=0.25, workers=1, progress=False, tasks=TASKS, object_scale=1.0, turns=(2, 3),
                  refuse_given_away=False, refer_every_class=False, kind_order=False):
    """Write images, train.json/test.json, one bench file per bench, annotations and corpus.txt; return their paths."""
    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    train_anns = _render_split(img_dir, "train", 0, n_train_images, seed, size, workers, progress, object_scale)
    test_anns = _render_split(img_dir, "test", 1, n_test_images, seed, size, workers, progress, object_scale)

    def records(anns):
        return [r for a in anns for r in instruct_records(a, a["image"], records_per_image, seed, multi_turn_prob, tasks,
                                                           turns, refuse_given_away, refer_every_class, kind_order)]

    train_recs, test_recs = records(train_anns), records(test_anns)
    bench = {name: [] for name in BENCHES}
    qid = 0
    for a in test_anns:
        rows, qid = bench_questions(a, a["image"], seed, qid)
        for name, items in rows.items():
            bench[name].extend(items)
    paths = {"images": img_dir, "train": out / "train.json", "test": out / "test.json",
             "annotations": out / "annotations.jsonl", "corpus": out / "corpus.txt"}
    paths["train"].write_text(json.dumps(train_recs))
    paths["test"].write_text(json.dumps(test_recs))
    with open(paths["annotations"], "w") as f:
        for a in train_anns + test_anns:
            f.write(json.dumps(a) + "\n")
    for name, rows in bench.items():
        paths[name] = out / f"{name}.jsonl"
        with open(paths[name], "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    with open(paths["corpus"], "w") as f:
        for line in _corpus_lines(train_recs + test_recs, bench):
            f.write(line + "\n")
    return paths


def train_tokenizer(corpus, out_model, vocab_size=2000, box_pieces=False, prompt_pieces=False):
    """Train a Llama-style SentencePiece BPE tokenizer.model (unk 0, bos 1, eos 2, byte fallback); returns (path, pieces).

    box_pieces: each box value "<0>" ... "<100>" becomes one piece of its own (a box is then 8 pieces, its values
    read as 101-way choices, instead of 16 with one digit a piece as in Llama's tokenizer).
    prompt_pieces: each of data.FIXED_PROMPT_PHRASES (the system prompts, the VQA and scene instructions, the refer
    and identify heads) becomes one piece: the synthetic records' text falls from 140 to 81 tokens on average.
    """
    out_model = Path(out_model)
    out_model.parent.mkdir(parents=True, exist_ok=True)
    symbols = (list(BOX_VALUE_PIECES) if box_pieces else []) + \
        ([phrase.replace(" ", "\u2581") for phrase in FIXED_PROMPT_PHRASES] if prompt_pieces else [])  # "▁": a space
    extra = {"user_defined_symbols": symbols} if symbols else {}
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_model.with_suffix("")), model_type="bpe", vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        normalization_rule_name="identity", hard_vocab_limit=False, remove_extra_whitespaces=False, character_coverage=1.0,
        max_sentence_length=100000, minloglevel=2, **extra,
    )
    out_model.with_suffix(".vocab").unlink(missing_ok=True)
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(out_model)).get_piece_size()
    return out_model, pieces


def _writable_dir(path: Path, flag: str) -> Path:
    """path as an output directory: it may exist (as a directory) or be creatable."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create the directory ({e.strerror})") from None
    return path


def scenes_main(args):
    """The `scenes` command: write the dataset, print where each file went."""
    for flag, value, low in (("--n-train", args.n_train, 0), ("--n-test", args.n_test, 0), ("--size", args.size, 16),
                             ("--records-per-image", args.records_per_image, 1), ("--workers", args.workers, 1)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.n_train + args.n_test == 0:
        raise UsageError("--n-train and --n-test are both 0: nothing to write")
    if not (math.isfinite(args.object_scale) and 0.5 <= args.object_scale <= 4):
        raise UsageError(f"--object-scale must be in [0.5, 4], got {args.object_scale}")
    if not 0 <= args.multi_turn_prob <= 1:
        raise UsageError(f"--multi-turn-prob must be in [0, 1], got {args.multi_turn_prob}")
    low_high = args.turns.split("-")
    turns = tuple(int(v) for v in low_high) if all(v.strip().isdigit() for v in low_high) else ()
    if len(turns) != 2 or not 2 <= turns[0] <= turns[1] <= 8:
        raise UsageError(f"--turns {args.turns!r}: expected MIN-MAX with 2 <= MIN <= MAX <= 8, e.g. 2-3")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS + PRETEXT_TASKS]
    if unknown or not tasks:
        raise UsageError(f"--tasks {args.tasks!r}: expected a comma-separated subset of "
                         f"{','.join(TASKS + PRETEXT_TASKS)}")
    out = _writable_dir(Path(args.out), "--out")
    start = time.time()
    paths = write_dataset(out, args.n_train, args.n_test, args.seed, args.size, args.records_per_image,
                          args.multi_turn_prob, args.workers, progress=True, tasks=tasks,
                          object_scale=args.object_scale, turns=turns, refuse_given_away=args.refuse_given_away,
                          refer_every_class=args.refer_every_class, kind_order=args.kind_order)
    print(f"wrote {args.n_train} train + {args.n_test} test images in {time.time() - start:.1f}s")
    for name, path in paths.items():
        print(f"  {name:<18} {path}")
    return paths


def tokenizer_main(args):
    """The `tokenizer` command: train, then say how many pieces it got."""
    corpus = Path(args.corpus)
    if not corpus.is_file():
        raise UsageError(f"--corpus {corpus}: no such file")
    if corpus.stat().st_size == 0:
        raise UsageError(f"--corpus {corpus}: the file is empty")
    least = MIN_VOCAB_SIZE + (len(BOX_VALUE_PIECES) if args.box_pieces else 0) + \
        (len(FIXED_PROMPT_PHRASES) if args.prompt_pieces else 0)
    if args.vocab_size < least:
        raise UsageError(f"--vocab-size must be >= {least} (256 byte pieces come first"
                         f"{', then the 101 box values' if args.box_pieces else ''}"
                         f"{', then the fixed prompt phrases' if args.prompt_pieces else ''}), got {args.vocab_size}")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {out}: is a directory; give the tokenizer.model file to write")
    _writable_dir(out.parent, "--out")
    path, pieces = train_tokenizer(corpus, out, args.vocab_size, args.box_pieces, args.prompt_pieces)
    print(f"wrote {path} ({pieces} pieces)")
    if pieces < args.vocab_size:
        print(f"note: the corpus only supports {pieces} pieces, fewer than --vocab-size {args.vocab_size}", file=sys.stderr)
    return path


def build_parser():
    """The command line: `scenes` and `tokenizer`."""
    p = argparse.ArgumentParser(prog="synthetic/prepare.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scenes", help="render scenes and write the training and bench files",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--out", required=True, help="output directory (created if missing)")
    s.add_argument("--n-train", type=int, default=20000, help="training scenes")
    s.add_argument("--n-test", type=int, default=500, help="held-out scenes (bench questions and test.json)")
    s.add_argument("--seed", type=int, default=0, help="dataset seed: the same seed writes the same files")
    s.add_argument("--size", type=int, default=128, help="image side in pixels")
    s.add_argument("--records-per-image", type=int, default=7, help="training records per scene (7 covers every task)")
    s.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks of the training records, "
                   f"from {','.join(TASKS + PRETEXT_TASKS)} (grid: a first-stage pretext task, one digit per "
                   "patch); bench files always cover every bench")
    s.add_argument("--object-scale", type=float, default=1.0, help="objects' sizes times this (0.5-4; larger: fewer "
                   "fit, an easier world for a first stage)")
    s.add_argument("--multi-turn-prob", type=float, default=0.25, help="share of records with several turns")
    s.add_argument("--turns", default="2-3", help="MIN-MAX questions in a multi-turn record (2 <= MIN <= MAX <= 8)")
    s.add_argument("--refuse-given-away", action="store_true",
                   help="multi-turn records never ask what an earlier turn gave away (a count after \"the plane\", "
                        "presence after a count), not only never the same question twice: such a question is drawn "
                        "again (questions stay in the order drawn, so the first one's answer is as likely as in a "
                        "single-question record), "
                        "and a grounded description, which gives every answer away, is a record of its own")
    s.add_argument("--refer-every-class", action="store_true",
                   help="a record about a scene of several classes that asks a [refer] question asks it of every class "
                        "(each a different box of the same image: only the class named decides the answer)")
    s.add_argument("--kind-order", action="store_true",
                   help="after a record's first question (the first drawn), ask presence, then count, comparison, the "
                        "scene, [identify] and [refer] last, whatever order they were drawn in (an order by kind, never "
                        "by answer): with --refuse-given-away a \"the plane\" no longer refuses a later \"Is there a "
                        "plane?\"")
    s.add_argument("--workers", type=int, default=1, help="rendering processes")
    s.set_defaults(func=scenes_main)
    t = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer.model on a corpus",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--corpus", required=True, help="text file, one sentence per line (scenes writes corpus.txt)")
    t.add_argument("--out", required=True, help="tokenizer.model file to write")
    t.add_argument("--vocab-size", type=int, default=2000, help="pieces to learn (fewer if the corpus is small)")
    t.add_argument("--box-pieces", action="store_true", help="one piece for each box value <0> ... <100> (Baby GeoChat's "
                   "tokenizer: a box coordinate is one token, not one or two digits)")
    t.add_argument("--prompt-pieces", action="store_true", help="one piece for each fixed phrase of the prompts (the "
                   "system prompt, the VQA and scene instructions, ...): shorter sequences, so faster training of a "
                   "small model; the prompts' text is unchanged")
    t.set_defaults(func=tokenizer_main)
    return p


def main(argv=None):
    """Run one command; bad input is one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
