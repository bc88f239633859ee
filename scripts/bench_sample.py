"""Generation speed: our engine against HF transformers `generate` (greedy, with cache), same weights.

Each (config, implementation) runs in its own subprocess so that peak resident memory (VmHWM) is
its own. Prefill = time to the first token; decode tokens/s = (N - 1) / (time for N tokens - time
for 1 token); best of --repeats. Prints a markdown table.

    python scripts/bench_sample.py                       # tiny and small, fp32 CPU
    python scripts/bench_sample.py --configs small --compile
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CONFIGS = {  # (vision: layers, width, image size, patch), (llama: layers, width, heads, mlp, vocab)
    "tiny": dict(vision=(2, 64, 56, 14), llm=(2, 64, 4, 128, 512)),
    "small": dict(vision=(6, 384, 224, 14), llm=(8, 768, 12, 2048, 32000)),
}
PROMPT_TOKENS = 40


def build_checkpoint(name: str, out: Path):
    """A random llava-hf checkpoint of a named config, saved with save_pretrained."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    (vl, vw, size, patch), (ll, lw, heads, mlp, vocab) = CONFIGS[name]["vision"], CONFIGS[name]["llm"]
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl, num_attention_heads=vw // 64,
                                       image_size=size, patch_size=patch, hidden_act="quick_gelu"),
        text_config=LlamaConfig(vocab_size=vocab, hidden_size=lw, intermediate_size=mlp, num_hidden_layers=ll,
                                num_attention_heads=heads, max_position_embeddings=2048),
        image_token_index=vocab - 1, vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(cfg)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def inputs(cfg_name: str):
    """(our ids with -200, image) for the benchmark prompt."""
    vocab = CONFIGS[cfg_name]["llm"][4]
    size = CONFIGS[cfg_name]["vision"][2]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab - 2, (1, PROMPT_TOKENS), generator=g)
    ids[0, 5] = -200
    return ids, torch.randn(1, 3, size, size, generator=g)


def peak_mb() -> float:
    """Peak resident memory of this process (VmHWM) in MB."""
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))


def best_time(fn, repeats: int) -> float:
    """Best wall time of fn() over repeats runs."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(impl: str, ckpt: str, cfg_name: str, new_tokens: int, repeats: int):
    """Time one implementation in this process and print a JSON line."""
    torch.manual_seed(0)
    ids, image = inputs(cfg_name)
    if impl == "hf":
        from transformers import LlavaForConditionalGeneration
        import hf_ref

        model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
        input_ids, mask = hf_ref.hf_inputs(model, ids)

        def run(n):
            with torch.inference_mode():
                out = model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=image, max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert out.shape[1] - input_ids.shape[1] == n
            return out[0, input_ids.shape[1]:].tolist()
    else:
        import sample
        from geochat import GeoChat

        model = GeoChat.from_pretrained(ckpt, dtype=torch.float32)
        no_stop = SimpleNamespace(eos_id=-1, pad_id=0, decode=lambda ids: "")  # run the whole budget, like HF above
        engine = sample.Engine(model, no_stop, compile=impl == "ours-compile")

        def run(n):
            out = engine.generate([ids[0].tolist()], image, max_new_tokens=n)[0].token_ids
            assert len(out) == n
            return out

    tokens = run(new_tokens)  # warm-up (and compile)
    run(1)
    first = best_time(lambda: run(1), repeats)
    full = best_time(lambda: run(new_tokens), repeats)
    print(json.dumps({"impl": impl, "prefill_ms": first * 1000, "decode_tok_s": (new_tokens - 1) / (full - first),
                      "peak_mb": peak_mb(), "tokens": tokens}))


def main():
    """Build each config's checkpoint, measure every implementation in a subprocess, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=CONFIGS)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time ours with the compiled decode step")
    p.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        return measure(args.measure[0], args.measure[1], args.measure[2], args.new_tokens, args.repeats)
    impls = ["hf", "ours"] + (["ours-compile"] if args.compile else [])
    rows = []
    for cfg_name in args.configs:
        ckpt = Path(tempfile.mkdtemp()) / cfg_name
        n_params = build_checkpoint(cfg_name, ckpt)
        results = {}
        for impl in impls:
            cmd = [sys.executable, __file__, "--measure", impl, str(ckpt), cfg_name, "--new-tokens", str(args.new_tokens),
                   "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[impl] = json.loads(out.strip().splitlines()[-1])
        same = all(r["tokens"] == results["hf"]["tokens"] for r in results.values())
        for impl, r in results.items():
            hf = results["hf"]
            rows.append(f"| {cfg_name} ({n_params / 1e6:.1f}M) | {impl} | {r['prefill_ms']:.1f} | {r['decode_tok_s']:.1f} | "
                        f"{r['decode_tok_s'] / hf['decode_tok_s']:.2f}x | {r['peak_mb']:.0f} | {'yes' if same else 'NO'} |")
    print(f"fp32, CPU, {torch.get_num_threads()} threads, prompt {PROMPT_TOKENS} tokens + image, {args.new_tokens} new tokens, best of {args.repeats}")
    print("| config | implementation | prefill ms | decode tok/s | vs HF | peak RSS MB | same tokens |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
