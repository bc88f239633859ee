"""Convert any checkpoint GeoChat.from_pretrained reads into our own layout (one safetensors file).

    python scripts/convert.py CHECKPOINT_DIR OUT_DIR [--dtype bfloat16] [--vision-tower CLIP_DIR]
"""

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from geochat import DTYPES, GeoChat  # noqa: E402



def main(argv=None):
    """Load CHECKPOINT_DIR and write config.json, model.safetensors and tokenizer.model to OUT_DIR."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--vision-tower", type=Path, default=None, help="separate CLIP directory, if not embedded")
    args = p.parse_args(argv)
    try:
        model = GeoChat.from_pretrained(args.checkpoint, dtype=DTYPES[args.dtype], vision_tower=args.vision_tower)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    tokenizer = args.checkpoint / "tokenizer.model"
    model.save_pretrained(args.out, tokenizer_model=tokenizer if tokenizer.exists() else None)
    if not tokenizer.exists():
        print(f"warning: {tokenizer} not found; copy a tokenizer.model into {args.out} before sampling", file=sys.stderr)
    n = sum(t.numel() for t in model.state_dict().values())
    print(f"wrote {args.out} ({n / 1e6:.1f}M parameters, {args.dtype})")


if __name__ == "__main__":
    main()
