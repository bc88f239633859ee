"""Peak resident memory of GeoChat.from_pretrained against the size of the weights it loads.

Writes a synthetic GeoChat-release checkpoint of about --gigabytes GB (fp16, two safetensors
shards and two .bin shards), then loads it in fresh subprocesses, as float16 (zero-copy from the
memory map) and as bfloat16 (converted tensor by tensor), and prints one JSON line:

    python scripts/bench_load.py --gigabytes 2.2
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MB: VmRSS (resident now) or VmHWM (peak resident, this process only)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def write_checkpoint(out: Path, gigabytes: float, fmt: str) -> int:
    """A random fp16 GeoChat-release checkpoint of roughly `gigabytes` in .bin or .safetensors shards."""
    import hf_ref
    from geochat import LLAVA_RELEASE_KEYS, GeoChat, GeoChatConfig, unmap_keys
    from llama import LlamaConfig
    from vit import ViTConfig

    dim = 1024
    n_layers = max(1, round((gigabytes * 1e9 / 2 - 2 * 32000 * dim) / (12 * dim * dim)))
    vision = ViTConfig(image_size=56, patch_size=14, width=64, n_layers=3, n_heads=4, mlp_dim=128)
    cfg = GeoChatConfig(vision=vision, llm=LlamaConfig(dim=dim, n_layers=n_layers, n_heads=16, intermediate_size=4 * dim),
                        image_size=56)
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = GeoChat(cfg).state_dict()
    names = unmap_keys(shapes, LLAVA_RELEASE_KEYS)
    state = {names[k]: torch.randn(v.shape, dtype=torch.float16) for k, v in shapes.items()}
    hf_ref.write_sharded(state, out, fmt)
    clip = out / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                                                  "intermediate_size": 128, "image_size": 56, "patch_size": 14}))
    (out / "config.json").write_text(json.dumps({
        "model_type": "geochat", "hidden_size": dim, "intermediate_size": 4 * dim, "num_hidden_layers": n_layers,
        "num_attention_heads": 16, "vocab_size": 32000, "mm_vision_tower": str(clip), "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_image_size": 56}))
    return sum(v.numel() * 2 for v in state.values())


def measure(ckpt: str, dtype: str):
    """Load in this (fresh) process; print baseline, peak and weight sizes as JSON."""
    from geochat import GeoChat

    before = status_mb("VmRSS")
    t0 = time.perf_counter()
    model = GeoChat.from_pretrained(ckpt, dtype=getattr(torch, dtype))
    seconds = time.perf_counter() - t0
    weights_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    peak_mb = status_mb("VmHWM")
    print(json.dumps({"dtype": dtype, "weights_mb": round(weights_mb), "baseline_mb": round(before),
                      "peak_mb": round(peak_mb), "load_s": round(seconds, 2),
                      "peak_over_weights": round((peak_mb - before) / weights_mb, 3)}))


def main():
    """Write the synthetic checkpoints and measure every (format, dtype) case in a subprocess."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gigabytes", type=float, default=2.2)
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--formats", nargs="+", default=["safetensors", "bin"], choices=["safetensors", "bin"])
    p.add_argument("--measure", nargs=2, metavar=("CKPT", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return measure(*args.measure)
    base = Path(args.dir or tempfile.mkdtemp())
    cases = []
    for fmt in args.formats:
        ckpt = base / f"synthetic-{fmt}"
        write_checkpoint(ckpt, args.gigabytes, fmt)
        for dtype in ("float16", "bfloat16"):
            out = subprocess.run([sys.executable, __file__, "--measure", str(ckpt), dtype], check=True, capture_output=True, text=True)
            case = {"format": fmt, **json.loads(out.stdout.strip().splitlines()[-1])}
            print(f"{fmt:12s} -> {dtype:9s} weights {case['weights_mb']} MB, peak RSS {case['peak_mb']} MB "
                  f"(baseline {case['baseline_mb']} MB), (peak - baseline) / weights = {case['peak_over_weights']}, "
                  f"{case['load_s']} s", file=sys.stderr)
            cases.append(case)
    print(json.dumps({"gigabytes": args.gigabytes, "cases": cases}))


if __name__ == "__main__":
    main()
