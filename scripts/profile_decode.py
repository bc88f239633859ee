"""Where one compiled decode step of GeoChat-7B's shape spends its time (one CUDA GPU; --dry-run: tiny, on CPU).

    python scripts/profile_decode.py                 # a random bf16 GeoChat-7B-shaped model, a few minutes
    python scripts/profile_decode.py --int8          # the same model quantised to int8 afterwards, profiled too
    python scripts/profile_decode.py --dry-run       # tiny shapes on CPU, eager: the same code paths

Prints markdown tables:
1. tokens/s of the engine's loop (which reads every step's tokens on the host to stop at </s>), with and without
   decode ahead (sample.Engine: the next step queued before the host reads), against the same compiled step called
   back to back with no host read (gpt-fast's loop): the cost of the host sync;
2. the GPU kernels of a step, summed by name (time per step, calls, share), and the GPU-busy share of the step;
3. each piece alone, each in a CUDA graph over 32 distinct layers' tensors (so L2 holds none of them):
   the decode-shaped linears one by one and fused (q+k+v, gate+up), and decode attention over the KV cache in
   the forms torch offers (SDPA with the boolean mask, eager and compiled; written as matmuls, compiled).
GB/s counts the bytes each piece must read (weights; K and V of the filled slots); the step's GB/s counts the
decoder's weights alone, as gpu_check.py and gpt-fast do.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import quant  # noqa: E402
import sample  # noqa: E402
from geochat import GeoChatConfig  # noqa: E402
from gpu_check import NO_STOP, decoder_weight_bytes, images, prompt, random_model, sync  # noqa: E402
from llama import LlamaConfig  # noqa: E402
from vit import ViTConfig  # noqa: E402

TINY = GeoChatConfig(vision=ViTConfig(image_size=56, width=64, n_layers=2, n_heads=4, mlp_dim=128), image_size=56,
                     llm=LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, intermediate_size=128,
                                     max_seq_len=1024))


def seconds_per_call(fn, device, reps: int) -> float:
    """Seconds one fn() takes: on CUDA replayed from a CUDA graph (no launch overhead), else timed in a loop."""
    if device.type != "cuda":
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / reps


def primed_session(engine, ids, image, new_tokens: int):
    """A session after the prompt's prefill and one decode step (which records the graph, if compiled): (session,
    logits)."""
    embeds, mask = engine.embed_prompts([ids], image)
    session = engine.new_session(1, embeds.shape[1], new_tokens)
    return session, session.decode(session.prefill(embeds, mask).argmax(-1))


def loop_rates(engine, model, device, n_text: int, new_tokens: int) -> dict:
    """Decode tokens/s of the engine's generate and of the same session steps called back to back (no host read)."""
    ids = prompt(n_text, model.cfg.llm.vocab_size, seed=7)
    image = images(model.cfg, 1, device, model.llm.embed_tokens.weight.dtype)
    engine.generate([ids], image, max_new_tokens=new_tokens)  # warm-up: compiles
    engine_rates = {}
    for ahead in (False, True):
        engine.decode_ahead = ahead
        engine_rates[ahead] = max(engine.generate([ids], image, max_new_tokens=new_tokens)[0].decode_tokens_per_s
                                  for _ in range(2))
    with torch.inference_mode():
        session, logits = primed_session(engine, ids, image, new_tokens)  # its first step left out, as generate does
        sync(device)
        steps = min(new_tokens, session.capacity - session.length) - 1
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = session.decode(logits.argmax(-1))
        sync(device)
        back_to_back = steps / (time.perf_counter() - t0)
    return {"engine": engine_rates[False], "engine_ahead": engine_rates[True], "back_to_back": back_to_back,
            "prompt": (ids, image)}


def kernel_table(engine, device, ids, image, steps: int, top: int) -> tuple:
    """GPU kernels of `steps` back-to-back decode steps summed by name: rows (name, us/step, calls/step) and the
    wall-clock us of a step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with torch.inference_mode():
        session, logits = primed_session(engine, ids, image, steps + 4)
        sync(device)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                logits = session.decode(logits.argmax(-1))
            sync(device)
            wall = (time.perf_counter() - t0) / steps * 1e6
    totals = {}
    for event in prof.events():
        if device.type == "cuda" and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if device.type != "cuda" and event.cpu_parent is not None:
            continue
        name = event.name
        us = event.device_time_total if device.type == "cuda" else event.cpu_time_total
        total, calls = totals.get(name, (0.0, 0))
        totals[name] = (total + us, calls + 1)
    rows = sorted(((name, us / steps, calls / steps) for name, (us, calls) in totals.items()), key=lambda r: -r[1])
    return rows[:top], sum(r[1] for r in rows), wall


def linear_rows(cfg: LlamaConfig, device, dtype, reps: int) -> list:
    """(name, us per layer, GB/s) of decode-shaped (M = 1) linears, each over n_layers distinct weights."""
    D, I, L = cfg.dim, cfg.intermediate_size, cfg.n_layers
    shapes = [("q (or k, v, o)", D, D), ("q+k+v fused", D, 3 * D), ("gate (or up)", D, I), ("gate+up fused", D, 2 * I),
              ("down", I, D)]
    rows = []
    x = torch.randn(1, 1, max(D, I), device=device, dtype=dtype)
    for name, k, n in shapes:
        weights = [torch.randn(n, k, device=device, dtype=dtype) for _ in range(L)]
        xs = x[..., :k]
        seconds = seconds_per_call(lambda: [F.linear(xs, w) for w in weights], device, reps) / L
        rows.append((name, seconds * 1e6, n * k * weights[0].element_size() / seconds / 1e9))
        del weights
    lm = torch.randn(cfg.vocab_size, D, device=device, dtype=dtype)
    seconds = seconds_per_call(lambda: F.linear(x[..., :D], lm), device, reps)
    rows.append(("lm_head (once per step)", seconds * 1e6, lm.numel() * lm.element_size() / seconds / 1e9))
    per_layer = {name: us for name, us, _ in rows}
    separate = 4 * per_layer["q (or k, v, o)"] + 2 * per_layer["gate (or up)"] + per_layer["down"]
    fused = per_layer["q+k+v fused"] + per_layer["q (or k, v, o)"] + per_layer["gate+up fused"] + per_layer["down"]
    layer_bytes = (4 * D * D + 3 * D * I) * x.element_size()
    rows.append(("one layer's 7 linears", separate, layer_bytes / separate / 1e3))
    rows.append(("one layer's linears, q+k+v and gate+up fused", fused, layer_bytes / fused / 1e3))
    return rows


def explicit_attention(q, k, v, mask):
    """Decode attention written as two matmuls and a float32 softmax: q (B, H, 1, D), k, v (B, H, S, D), mask (B, 1, 1, S)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])  # (B, H, 1, S)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype)
    return torch.matmul(probs, v)  # (B, H, 1, D)


def attention_rows(cfg: LlamaConfig, device, dtype, capacity: int, filled: int, reps: int) -> list:
    """(name, us per layer, GB/s of K and V of the filled slots) of one decode query over a (1, H, capacity, D) cache."""
    H, D, L = cfg.n_heads, cfg.head_dim, cfg.n_layers
    caches = [(torch.randn(1, H, capacity, D, device=device, dtype=dtype),
               torch.randn(1, H, capacity, D, device=device, dtype=dtype)) for _ in range(L)]
    q = torch.randn(1, H, 1, D, device=device, dtype=dtype)
    mask = torch.zeros(1, 1, 1, capacity, dtype=torch.bool, device=device)
    mask[..., :filled] = True
    forms = [("SDPA + boolean mask over the whole cache, eager", lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask)),
        ("SDPA + boolean mask over the whole cache, compiled", torch.compile(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), fullgraph=True, dynamic=False)),
        ("matmuls + float32 softmax, compiled", torch.compile(
            lambda q, k, v: explicit_attention(q, k, v, mask), fullgraph=True, dynamic=False)),
        ("SDPA over the filled slots only, no mask (needs a per-length graph)", lambda q, k, v:
            F.scaled_dot_product_attention(q, k[:, :, :filled], v[:, :, :filled]))]
    kv_bytes = 2 * H * filled * D * q.element_size()
    rows = []
    for name, fn in forms:
        seconds = seconds_per_call(lambda: [fn(q, k, v) for k, v in caches], device, reps) / L
        rows.append((name, seconds * 1e6, kv_bytes / seconds / 1e9))
    return rows


def md_table(header, rows, formats) -> str:
    """A markdown table: one format string per column."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f.format(v) for f, v in zip(formats, row)) + " |" for row in rows]
    return "\n".join(lines)


def profile_model(model, device, label: str, n_text: int, new_tokens: int, steps: int, compile_step: bool,
                  rates_only: bool = False) -> str:
    """The markdown report of one model's decode: the loops' tokens/s, then (unless rates_only) its kernel table."""
    engine = sample.Engine(model, NO_STOP, compile=compile_step)
    rates = loop_rates(engine, model, device, n_text, new_tokens)
    weight_gb = decoder_weight_bytes(model) / 1e9
    ids, image = rates["prompt"]
    out = [f"### {label}: {'compiled' if compile_step else 'eager'} decode step",
           f"decoder weights read per step: {weight_gb:.2f} GB",
           "", md_table(["loop", "tok/s", "weights GB/s"],
                        [("engine, decode ahead off (the host reads each step's tokens, then queues the next)",
                          rates["engine"], rates["engine"] * weight_gb),
                         ("engine, decode ahead on (step t+1 queued before the host reads step t)",
                          rates["engine_ahead"], rates["engine_ahead"] * weight_gb),
                         ("back to back (no host read)", rates["back_to_back"], rates["back_to_back"] * weight_gb)],
                        ["{}", "{:.1f}", "{:.0f}"])]
    if rates_only:
        return "\n".join(out)
    kernels, busy_us, wall_us = kernel_table(engine, device, ids, image, steps, top=15)
    out += ["", f"one back-to-back step: {wall_us:.0f} us wall, kernels {busy_us:.0f} us "
               f"({100 * busy_us / wall_us:.0f}% busy)", "",
           md_table(["kernel", "us/step", "calls/step", "share"],
                    [(name[:90].replace("|", "/"), us, calls, 100 * us / busy_us) for name, us, calls in kernels],
                    ["`{}`", "{:.0f}", "{:.0f}", "{:.1f}%"])]
    return "\n".join(out)


def main(argv=None) -> int:
    """Profile, print and optionally save; exit code 2 on bad input."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, eager")
    p.add_argument("--int8", action="store_true", help="also profile the model quantised to int8 (compiled)")
    p.add_argument("--rates-only", action="store_true", help="only the loops' tokens/s: no kernel table, no pieces")
    p.add_argument("--out", default=None, help="also write the report to this markdown file (must not exist)")
    args = p.parse_args(argv)
    if args.out is not None and Path(args.out).exists():
        print(f"profile_decode.py: error: {args.out} exists; choose a new file", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("profile_decode.py: error: no CUDA GPU; use --dry-run for the CPU smoke run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    cfg = TINY if args.dry_run else GeoChatConfig.from_name("geochat-7b")
    n_text, new_tokens, steps, reps = (8, 12, 4, 3) if args.dry_run else (32, 128, 20, 20)
    compile_step = not args.dry_run
    dtype = torch.bfloat16
    report = [f"# Decode profile: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (dry run)'}, "
              f"torch {torch.__version__}"]
    model = random_model(cfg, device, dtype)
    report.append(profile_model(model, device, "bf16", n_text, new_tokens, steps, compile_step, args.rates_only))
    print(report[-1], flush=True)
    if args.int8:
        quant.quantize_model(model, "int8")
        report.append(profile_model(model, device, "int8", n_text, new_tokens, steps, compile_step, args.rates_only))
        print(report[-1], flush=True)
    del model
    if args.rates_only:
        return write_report(report, args.out)
    llm = cfg.llm
    prompt_len = cfg.n_image_tokens + n_text + 2
    capacity = max(sample.MIN_COMPILED_CAPACITY, 1 << (prompt_len + new_tokens - 1).bit_length())
    report.append("### Pieces alone (CUDA graph over the layers' distinct tensors), bf16\n\n" + md_table(
        ["linear, M = 1", "us per layer", "GB/s"], linear_rows(llm, device, dtype, reps), ["{}", "{:.1f}", "{:.0f}"]))
    print(report[-1], flush=True)
    report.append(f"Decode attention, one query over a cache of {capacity} slots, {prompt_len + new_tokens // 2} filled:"
                  "\n\n" + md_table(["form", "us per layer", "GB/s"],
                                    attention_rows(llm, device, dtype, capacity, prompt_len + new_tokens // 2, reps),
                                    ["{}", "{:.1f}", "{:.0f}"]))
    print(report[-1], flush=True)
    return write_report(report, args.out)


def write_report(report: list, out) -> int:
    """Write the report's sections to `out` (if given); the exit code 0."""
    if out:
        Path(out).write_text("\n\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
