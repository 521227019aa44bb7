#!/usr/bin/env python3
"""PyTorch's peer of Steel's flash attention (`steel-bench kernels --device cuda`, the rows
attention_fwd / attention_bwd): `scaled_dot_product_attention` with the FlashAttention backend
pinned, causal, on the same bf16 tensors ([B, T, H, D] in memory, viewed as [B, H, T, D]).
Run only where a GPU and PyTorch exist (scripts/gpu-check.sh does); never a product dependency.

    python3 bench/attention_torch.py --batch 8 --seq 2048 --heads 32 --head-dim 56 > peer.json

Prints one JSON line: medians in ms of the forward and of the backward (a backward alone, from
a saved graph, `repeats` times), and TFLOP/s with the standard causal count (forward
2·B·H·T²·D, backward 2.5× that).
"""
import argparse
import json
import statistics
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    ap.add_argument("--head-dim", type=int, default=56)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        print(json.dumps({"error": f"PyTorch with torch.nn.attention is needed: {e}"}))
        return 1
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        return 1
    b, t, h, d = args.batch, args.seq, args.heads, args.head_dim
    hkv = args.kv_heads or h
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(heads):
        # Steel's layout in memory; SDPA takes the [B, H, T, D] view (FlashAttention's own layout).
        x = torch.randn(b, t, heads, d, device=dev, dtype=torch.bfloat16, generator=g)
        return x.transpose(1, 2).requires_grad_(True)

    q, k, v = rnd(h), rnd(hkv), rnd(hkv)
    scale = d ** -0.5
    gqa = {"enable_gqa": True} if hkv != h else {}

    def fwd():
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, **gqa)

    def timed(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for i in range(args.repeats + 2):
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            if i >= 2:  # warm-up
                times.append(start.elapsed_time(end))
        return statistics.median(times)

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with torch.no_grad():
            fwd_ms = timed(fwd)
        do = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16, generator=g)
        out = fwd()

        def bwd():
            torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

        bwd_ms = timed(bwd)
    flops = 2.0 * b * h * t * t * d
    print(json.dumps({
        "peer": f"torch {torch.__version__} sdpa FLASH_ATTENTION",
        "device": torch.cuda.get_device_name(),
        "shape": [b, t, h, hkv, d],
        "fwd_ms": fwd_ms,
        "bwd_ms": bwd_ms,
        "fwd_tflops": flops / fwd_ms / 1e9,
        "bwd_tflops": 2.5 * flops / bwd_ms / 1e9,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
