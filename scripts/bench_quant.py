"""GeoChat-7B on a CPU: float32, bfloat16 storage, int8 and int4 (ours), HF transformers and llama.cpp, same weights.

The model is GeoChat-7B's real widths at reduced depth (Vicuna-7B widths with --layers decoder layers, ViT-L/14 at
504 px with 2 blocks); every number per layer is measured on it and projected to the full model (32 decoder
layers, 23 ViT blocks). All sides run in this one process, one after the other, on the same random weights:

    python scripts/bench_quant.py                  # every side; llama.cpp needs llama-cpp-python and gguf
    python scripts/bench_quant.py --sides ours-fp32,ours-int8 --decode-tokens 8

Time to first token = vision tower + projector + prefill of --prompt-tokens (1,330: the image's 1,296 tokens and a
question) + lm_head on the last row. Decode = mean of --decode-tokens single-token steps after the prompt.
Per decoder layer: ours and HF subtract a separately timed final norm + lm_head from the whole decoder and divide by
--layers; llama.cpp (which cannot time its head alone) is run at --layers and at 1 layer and takes the difference.
Resident memory is projected from the stored bytes of every tensor the side holds (one layer x 32, embeddings,
lm_head, vision tower, projector) plus a KV cache of 2,048 positions; llama.cpp's from its GGUF's tensor sizes.

Benchmark-only extras (never needed by the tests or CI): `pip install gguf llama-cpp-python` (llama-cpp-python
builds llama.cpp from source, about 10 minutes on 2 cores). A side whose package is missing is reported as skipped.
Speed goals (issue 16), per decoder layer on the same CPU: decode int8 <= llama.cpp Q8_0, int4 <= Q4_0, float32
<= 1.2x llama.cpp F32; prefill no slower than llama.cpp at the same precision; full GeoChat-7B int8 under 9 GB.
"""

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quant  # noqa: E402
import sample  # noqa: E402
from geochat import Projector  # noqa: E402
from llama import Llama, LlamaConfig  # noqa: E402
from vit import VisionTower, ViTConfig  # noqa: E402

# --config: decoder (dim, heads, mlp, vocab, full depth), vision (width, heads, mlp, patch, image size, full blocks)
CONFIGS = {
    "7b": dict(llm=(4096, 32, 11008, 32000, 32), vision=(1024, 16, 4096, 14, 504, 23)),  # GeoChat-7B: Vicuna-7B, ViT-L/14
    "small": dict(llm=(768, 12, 2048, 32000, 8), vision=(384, 6, 1536, 14, 224, 5)),  # bench_sample.py's small config
}
KV_POSITIONS = 2048
OURS = {  # side: (weight storage, activation dtype)
    "ours-fp32": (None, torch.float32), "ours-bf16": (None, torch.bfloat16),
    "ours-int8": ("int8", torch.float32), "ours-int8-bf16act": ("int8", torch.bfloat16),
    "ours-int4": ("int4", torch.float32), "ours-int4-bf16act": ("int4", torch.bfloat16),
}
HF = {"hf-fp32": torch.float32, "hf-bf16": torch.bfloat16}
LLAMA_CPP = {"llama.cpp-F32": "F32", "llama.cpp-F16": "F16", "llama.cpp-Q8_0": "Q8_0", "llama.cpp-Q4_0": "Q4_0"}
SIDES = list(OURS) + list(HF) + list(LLAMA_CPP)


def timed(fn, repeats: int = 1) -> float:
    """Best wall time of fn() in seconds over repeats."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages of a module's parameters and buffers."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def random_decoder(config: str, layers: int) -> Llama:
    """The config's decoder widths at `layers` layers, float32, seeded weights of Llama-like scale (std 0.02)."""
    dim, heads, mlp, vocab, _ = CONFIGS[config]["llm"]
    with torch.device("meta"):
        model = Llama(LlamaConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, intermediate_size=mlp,
                                  max_seq_len=4096))
    torch.manual_seed(0)
    state = {k: (torch.randn(v.shape) * 0.02 if not k.endswith("norm.weight") else torch.ones(v.shape))
             for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    return model.eval()


def time_vision(config: str, dtype) -> tuple[float, int]:
    """(seconds per vision block, bytes of the full tower + projector projected from 2 blocks) in dtype."""
    width, heads, mlp, patch, size, full_blocks = CONFIGS[config]["vision"]
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=size, patch_size=patch, width=width, n_layers=3, n_heads=heads, mlp_dim=mlp)  # 2 blocks built
    tower = VisionTower(cfg, size, -2).to(dtype).eval()
    projector = Projector(width, CONFIGS[config]["llm"][0]).to(dtype)
    if quant.prefill_dtype(dtype, torch.device("cpu")) != dtype:  # as sample.load
        quant.use_float32_prefill(tower)
        quant.use_float32_prefill(projector)
    image = torch.randn(1, 3, size, size, dtype=dtype)
    block_bytes = tensor_bytes(tower.blocks[0])
    with torch.inference_mode():
        tower(image)  # warm-up
        whole = timed(lambda: projector(tower(image)))
        tower.blocks = tower.blocks[:0]
        none = timed(lambda: projector(tower(image)))
    rest = tensor_bytes(tower) + tensor_bytes(projector)
    return max((whole - none) / 2, 0.0), rest + block_bytes * full_blocks


def run_ours(side: str, llm: Llama, prompt: torch.Tensor, decode_tokens: int, full_layers: int) -> dict:
    """Time prefill and decode of our decoder for one side (quantising a copy of the weights where asked)."""
    mode, dtype = OURS[side]
    model = Llama(llm.cfg).eval()
    model.load_state_dict(llm.state_dict())
    model.to(dtype)
    if mode is not None:  # quantize_model takes a GeoChat-shaped module: .llm and .cfg.quantization
        holder = torch.nn.Module()
        holder.llm, holder.cfg = model, SimpleNamespace(quantization=None)
        quant.quantize_model(holder, mode)
    if quant.prefill_dtype(dtype, torch.device("cpu")) != dtype:  # what sample.load does for --dtype bfloat16 here
        quant.use_float32_prefill(model)
    per_layer_bytes = tensor_bytes(model.layers[0])  # before the KV cache, counted on its own in kv_bytes
    rest_bytes = tensor_bytes(model.embed_tokens) + tensor_bytes(model.lm_head) + tensor_bytes(model.norm)
    embeds = prompt.to(dtype)[None]  # (1, T, dim)
    T = embeds.shape[1]
    with torch.inference_mode():
        model.setup_cache(1, KV_POSITIONS)
        slots = torch.arange(KV_POSITIONS)

        def prefill():
            return model(embeds, None, None, slots[:T], last_only=True)

        model(embeds[:, :64], None, None, slots[:64], last_only=True)  # warm-up
        prefill_s = timed(prefill)
        key_valid = torch.zeros(1, KV_POSITIONS, dtype=torch.bool)
        key_valid[:, :T] = True
        token = torch.tensor([[7]])

        def decode(steps):
            for step in range(steps):
                key_valid[:, T + step] = True
                sample.decode_step(model, token, torch.tensor([[T + step]]), slots[T + step: T + step + 1],
                                   key_valid[:, : T + step + 1])

        decode(1)  # warm-up
        decode_s = timed(lambda: decode(decode_tokens)) / decode_tokens
        hidden_last, hidden_one = embeds[:, -1:], embeds[:, :1]
        head_s = timed(lambda: model.lm_head(model.norm(hidden_last)), repeats=5)
        head_decode_s = timed(lambda: model.lm_head(model.norm(hidden_one)), repeats=5)
    kv_bytes = 2 * full_layers * KV_POSITIONS * llm.cfg.dim * dtype.itemsize
    layers = llm.cfg.n_layers
    return dict(prefill_layer=(prefill_s - head_s) / layers, decode_layer=(decode_s - head_decode_s) / layers,
                head_prefill=head_s, head_decode=head_decode_s, weight_bytes=per_layer_bytes * full_layers + rest_bytes,
                kv_bytes=kv_bytes, dtype=dtype)


def run_hf(side: str, llm: Llama, prompt: torch.Tensor, decode_tokens: int, full_layers: int) -> dict:
    """The same decoder as HF LlamaForCausalLM (same weights), prefill with cache, then cached single-token steps."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    dtype = HF[side]
    cfg = llm.cfg
    with torch.device("meta"):
        hf = LlamaForCausalLM(HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.intermediate_size,
                                       num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                       max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps))
    names = {"attn.": "self_attn.", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    state = {}
    for key, value in llm.state_dict().items():
        hf_key = key if key == "lm_head.weight" else "model." + key
        for ours, theirs in names.items():
            hf_key = hf_key.replace(ours, theirs)
        state[hf_key] = value.to(dtype)
    hf.load_state_dict(state, assign=True, strict=False)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config)  # its inv_freq buffer, rebuilt off the meta device
    hf.eval()
    embeds = prompt.to(dtype)[None]
    with torch.inference_mode():
        hf(inputs_embeds=embeds[:, :64], use_cache=True)  # warm-up
        cache = {}

        def prefill():
            cache["past"] = hf(inputs_embeds=embeds, use_cache=True, logits_to_keep=1).past_key_values

        prefill_s = timed(prefill)
        token = torch.tensor([[7]])

        def decode(steps):
            past = cache["past"]
            for _ in range(steps):
                past = hf(input_ids=token, past_key_values=past, use_cache=True).past_key_values

        decode(1)
        decode_s = timed(lambda: decode(decode_tokens)) / decode_tokens
        head_s = timed(lambda: hf.lm_head(hf.model.norm(embeds[:, -1:])), repeats=5)
    weight_bytes = tensor_bytes(hf.model.layers[0]) * full_layers + tensor_bytes(hf.model.embed_tokens) + tensor_bytes(hf.lm_head)
    layers = cfg.n_layers
    return dict(prefill_layer=(prefill_s - head_s) / layers, decode_layer=(decode_s - head_s) / layers, head_prefill=head_s,
                head_decode=head_s, weight_bytes=weight_bytes, kv_bytes=2 * full_layers * KV_POSITIONS * cfg.dim * dtype.itemsize,
                dtype=dtype)


def write_gguf(path: Path, llm: Llama, layers: int, qtype: str) -> int:
    """llm's first `layers` layers as a llama GGUF with tensors in qtype (norms in F32); returns the tensor bytes."""
    import gguf
    import numpy as np

    kind = getattr(gguf.GGMLQuantizationType, qtype)
    cfg = llm.cfg
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([b"<unk>", b"<s>", b"</s>"] + [f"<t{i}>".encode() for i in range(3, cfg.vocab_size)])
    writer.add_token_scores([0.0] * cfg.vocab_size)
    writer.add_token_types([2, 3, 3] + [1] * (cfg.vocab_size - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {"attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "attn_norm": "attn_norm",
             "mlp_norm": "ffn_norm"}
    tensors = {"token_embd.weight": llm.embed_tokens.weight, "output_norm.weight": llm.norm.weight,
               "output.weight": llm.lm_head.weight}
    for i in range(layers):
        for ours, theirs in names.items():
            tensors[f"blk.{i}.{theirs}.weight"] = llm.get_submodule(f"layers.{i}.{ours}").weight
    total = 0
    for name, tensor in tensors.items():
        array = tensor.detach().float().numpy()
        if array.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:
            data, raw = array, gguf.GGMLQuantizationType.F32
        elif kind == gguf.GGMLQuantizationType.F16:
            data, raw = array.astype(np.float16), gguf.GGMLQuantizationType.F16
        else:
            data, raw = gguf.quants.quantize(array, kind), kind
        writer.add_tensor(name, data, raw_dtype=raw)
        total += data.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return total


def time_llama_cpp(path: Path, prompt_tokens: int, decode_tokens: int, threads: int) -> tuple[float, float]:
    """(prefill seconds for prompt_tokens, seconds per decode token) of a GGUF through llama-cpp-python."""
    from llama_cpp import Llama as LlamaCpp

    model = LlamaCpp(model_path=str(path), n_ctx=KV_POSITIONS, n_batch=512, n_threads=threads, verbose=False)
    tokens = torch.randint(3, 31000, (prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    model.eval(tokens[:64])  # warm-up
    model.reset()
    prefill_s = timed(lambda: model.eval(tokens))
    model.eval([7])  # warm-up step
    start = time.perf_counter()
    for _ in range(decode_tokens):
        model.eval([7])
    decode_s = (time.perf_counter() - start) / decode_tokens
    return prefill_s, decode_s


def run_llama_cpp(side: str, llm: Llama, prompt_tokens: int, decode_tokens: int, threads: int, full_layers: int) -> dict:
    """llama.cpp at llm's depth and at 1 layer: the difference is one layer, the rest is its head and embedding."""
    qtype = LLAMA_CPP[side]
    layers = llm.cfg.n_layers
    with tempfile.TemporaryDirectory() as folder:
        results = {}
        for depth in (layers, 1):
            path = Path(folder) / f"model-{depth}.gguf"
            size = write_gguf(path, llm, depth, qtype)
            results[depth] = (*time_llama_cpp(path, prompt_tokens, decode_tokens, threads), size)
            path.unlink()
    (p_all, d_all, s_all), (p_one, d_one, s_one) = results[layers], results[1]
    per_layer_bytes = (s_all - s_one) / (layers - 1)
    kv_bytes = 2 * full_layers * KV_POSITIONS * llm.cfg.dim * 2  # llama.cpp's default f16 KV cache
    return dict(prefill_layer=(p_all - p_one) / (layers - 1), decode_layer=(d_all - d_one) / (layers - 1),
                head_prefill=p_one - (p_all - p_one) / (layers - 1), head_decode=d_one - (d_all - d_one) / (layers - 1),
                weight_bytes=per_layer_bytes * full_layers + (s_one - per_layer_bytes), kv_bytes=kv_bytes, dtype=None)


def kernel_table(repeats: int) -> list[str]:
    """Markdown rows: the 4096x4096 linear per kernel at decode (M=1) and prefill (M=1330) rows, in ms."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(4096, 4096, bias=False)
    rows = ["| kernel (4096x4096) | M=1 ms | M=16 ms | M=1330 ms |", "|---|---|---|---|"]
    cases = {
        "fp32 F.linear": (lambda x: torch.nn.functional.linear(x, linear.weight), torch.float32),
        "bf16 F.linear": (lambda x, w=linear.weight.bfloat16(): torch.nn.functional.linear(x, w), torch.bfloat16),
    }
    for mode in quant.QUANT_MODES:
        layer = quant.QuantLinear.from_linear(linear, mode)
        cases[f"ours {mode}, fp32 activations"] = (layer, torch.float32)
        cases[f"ours {mode}, bf16 activations"] = (layer, torch.bfloat16)
        cases[f"{mode} dequantise + fp32 GEMM"] = (lambda x, l=layer: torch.nn.functional.linear(x, l.dequantized(torch.float32)),
                                                   torch.float32)
    with torch.inference_mode():
        for name, (fn, dtype) in cases.items():
            times = []
            for m in (1, 16, 1330):
                x = torch.randn(m, 4096, dtype=dtype)
                fn(x)
                times.append(timed(lambda: fn(x), repeats if m < 1330 else 1) * 1000)
            rows.append(f"| {name} | {times[0]:.2f} | {times[1]:.2f} | {times[2]:.0f} |")
        # candidates for the decode GEMV that are not wired in: inductor's C++ reductions, compiled here
        fused = {
            "inductor GEMV, fp32 weight": (lambda x, w: (x * w).sum(-1)[None], linear.weight.detach()),
            "inductor GEMV, int8 weight": (lambda x, w, s=quant.quantize_int8(linear.weight)[1]: (x * w.float()).sum(-1)[None] * s,
                                           quant.quantize_int8(linear.weight)[0]),
        }
        x = torch.randn(1, 4096)
        for name, (fn, weight) in fused.items():
            compiled = torch.compile(fn, dynamic=False, options={"cpp_wrapper": True})
            compiled(x, weight)
            rows.append(f"| {name} (not used) | {timed(lambda: compiled(x, weight), repeats) * 1000:.2f} | - | - |")
    return rows


def main(argv=None):
    """Run the asked sides and print the kernel table and the per-layer / projected table (markdown)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the reduced model (at least 2)")
    p.add_argument("--prompt-tokens", type=int, default=1330, help="prompt length: the image's 1,296 tokens + a question")
    p.add_argument("--decode-tokens", type=int, default=8, help="decode steps timed after the prompt")
    p.add_argument("--config", choices=CONFIGS, default="7b", help="widths: GeoChat-7B's, or bench_sample.py's small config")
    p.add_argument("--kernels", action="store_true", help="also time the 4096x4096 linear per kernel")
    args = p.parse_args(argv)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIDES]
    if unknown or args.layers < 2 or args.prompt_tokens < 64 or args.decode_tokens < 1:
        print(f"error: unknown sides {unknown}" if unknown else "error: needs --layers >= 2, --prompt-tokens >= 64, "
              "--decode-tokens >= 1", file=sys.stderr)
        sys.exit(2)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"fast bf16 GEMM (AMX): {quant.fast_bf16_gemm_cpu()}")
    if args.kernels:
        print("\n".join(kernel_table(repeats=5)) + "\n")
    llm = random_decoder(args.config, args.layers)
    full_layers, full_blocks = CONFIGS[args.config]["llm"][4], CONFIGS[args.config]["vision"][5]
    prompt = torch.randn(args.prompt_tokens, llm.cfg.dim, generator=torch.Generator().manual_seed(1))
    vision = {dtype: time_vision(args.config, dtype) for dtype in (torch.float32, torch.bfloat16)}
    results, skipped = {}, {}
    for side in sides:
        try:
            if side in OURS:
                results[side] = run_ours(side, llm, prompt, args.decode_tokens, full_layers)
            elif side in HF:
                results[side] = run_hf(side, llm, prompt, args.decode_tokens, full_layers)
            else:
                results[side] = run_llama_cpp(side, llm, args.prompt_tokens, args.decode_tokens, threads, full_layers)
        except ImportError as e:
            skipped[side] = f"not installed ({e.name})"
        except Exception as e:  # a side that fails is reported, not allowed to end the run (llama.cpp builds vary)
            skipped[side] = f"failed ({type(e).__name__}: {str(e)[:120]})"
        gc.collect()
        if side in results:
            print(f"done {side}", file=sys.stderr, flush=True)
    base = results.get("ours-fp32")
    print("| side | decode ms / layer | vs ours fp32 | prefill s / layer | vs ours fp32 | projected TTFT s | "
          "projected decode tok/s | projected resident GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for side, r in results.items():
        vision_s, vision_bytes = vision[r["dtype"] if r["dtype"] in vision else torch.float32]
        ttft = vision_s * full_blocks + r["prefill_layer"] * full_layers + r["head_prefill"]
        tok_s = 1 / (r["decode_layer"] * full_layers + r["head_decode"])
        gib = (r["weight_bytes"] + r["kv_bytes"] + vision_bytes) / 2 ** 30
        ratio_d = f"{r['decode_layer'] / base['decode_layer']:.2f}x" if base else "-"
        ratio_p = f"{r['prefill_layer'] / base['prefill_layer']:.2f}x" if base else "-"
        print(f"| {side} | {r['decode_layer'] * 1000:.1f} | {ratio_d} | {r['prefill_layer']:.2f} | {ratio_p} | {ttft:.0f} | "
              f"{tok_s:.2f} | {gib:.1f} |")
    for side, why in skipped.items():
        print(f"| {side} | skipped: {why} | | | | | | |")
    for dtype, (per_block, _) in vision.items():
        print(f"\nvision block, {str(dtype)[6:]}: {per_block:.3f} s (x {full_blocks} in the projected TTFT of every side "
              "computing in that dtype; llama.cpp rows use the float32 tower)")


if __name__ == "__main__":
    main()
