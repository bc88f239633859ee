"""Convert any checkpoint GeoChat.from_pretrained reads into our own layout (one safetensors file).

    python scripts/convert.py CHECKPOINT_DIR OUT_DIR [--dtype bfloat16] [--vision-tower CLIP_DIR]
                              [--quantize int8|int4 [--group-size 128]]

With --quantize the decoder linears and lm_head are written as int8 / int4 with float32 scales (quant.py's
layout); --dtype is then the dtype of everything else (vision tower, projector, embeddings, norms).
"""

import argparse
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import quant  # noqa: E402
from geochat import DTYPES, GeoChat  # noqa: E402



def fail(message: str):
    """One line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_out(out: Path) -> bool:
    """The destination must be a new or empty directory that we can write; True when this call created it."""
    if out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        fail(f"{out}: the directory is not empty; choose a new one (nothing is overwritten)")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{out}: cannot create the directory ({e.strerror})")
    if not os.access(out, os.W_OK):
        fail(f"{out}: the directory is not writable")
    return created


def main(argv=None):
    """Load CHECKPOINT_DIR and write config.json, model.safetensors and tokenizer.model to OUT_DIR."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="directory in any layout GeoChat.from_pretrained reads")
    p.add_argument("out", type=Path, help="new directory to write (must not exist or be empty)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the written weights")
    p.add_argument("--vision-tower", type=Path, default=None, help="separate CLIP directory, if not embedded")
    p.add_argument("--quantize", choices=quant.QUANT_MODES, default=None,
                   help="write the decoder linears and lm_head as int8 (per channel) or int4 (per group) weights")
    p.add_argument("--group-size", type=int, default=None,
                   help=f"int4: input columns per scale, a power of two; None: {quant.DEFAULT_GROUP_SIZE}")
    args = p.parse_args(argv)
    if args.group_size is not None and args.quantize != "int4":
        fail("--group-size only applies with --quantize int4")
    group_size = quant.DEFAULT_GROUP_SIZE if args.group_size is None else args.group_size
    if group_size < 2 or group_size & (group_size - 1):
        fail(f"--group-size {group_size} must be a power of two >= 2")
    created = check_out(args.out)
    try:
        model = GeoChat.from_pretrained(args.checkpoint, dtype=DTYPES[args.dtype], vision_tower=args.vision_tower)
        if args.quantize is not None:
            quant.quantize_model(model, args.quantize, group_size)
    except (FileNotFoundError, ValueError) as e:
        if created:
            args.out.rmdir()
        fail(str(e))
    tokenizer = args.checkpoint / "tokenizer.model"
    model.save_pretrained(args.out, tokenizer_model=tokenizer if tokenizer.exists() else None)
    if not tokenizer.exists():
        print(f"warning: {tokenizer} not found; copy a tokenizer.model into {args.out} before sampling", file=sys.stderr)
    n = sum(t.numel() for t in model.state_dict().values())
    what = args.dtype if args.quantize is None else f"{args.quantize} decoder linears, {args.dtype} elsewhere"
    print(f"wrote {args.out} ({n / 1e6:.1f}M stored values, {what})")


if __name__ == "__main__":
    main()
