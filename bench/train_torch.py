#!/usr/bin/env python3
"""PyTorch eager baseline for `steel-bench train`: the same Steel model (Qwen1.5 attention with
RoPE and GQA, the soft-MoE of "senet" double-SwiGLU experts), full logits + F.cross_entropy,
torch.optim.AdamW, fp32 on the CPU. Never a product dependency: run it from its own venv.

    python3 -m venv bench/.venv && bench/.venv/bin/pip install torch
    bench/.venv/bin/python bench/train_torch.py --model-config configs/bench-h512/config.json \
        --seq 256 --batch 4 --steps 10 --threads 2

Prints one JSON line: {"tokens_per_s": median, "step_ms": median, ...}.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, h, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, self.nh, self.nkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        self.hd = h // self.nh
        self.q = nn.Linear(h, self.nh * self.hd)
        self.k = nn.Linear(h, self.nkv * self.hd)
        self.v = nn.Linear(h, self.nkv * self.hd)
        self.o = nn.Linear(self.nh * self.hd, h, bias=False)
        self.theta = c["rope_theta"]

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.nkv, self.hd).transpose(1, 2)
        inv = 1.0 / (self.theta ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))
        ang = torch.outer(torch.arange(t, dtype=torch.float32), inv)
        emb = torch.cat([ang, ang], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = self.nh // self.nkv
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(o.transpose(1, 2).reshape(b, t, -1))


class Senet(nn.Module):
    def __init__(self, h, w):
        super().__init__()
        self.gate_up = nn.Linear(h, w, bias=False)
        self.up = nn.Linear(h, w, bias=False)
        self.gate_down = nn.Linear(w, h, bias=False)
        self.down = nn.Linear(w, h, bias=False)

    def forward(self, x):
        u = F.silu(self.gate_up(x)) * self.up(x)
        return F.silu(self.gate_down(u)) * self.down(u)


class SoftMoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, self.e, self.s = c["hidden_size"], c["n_experts"], c["slots_per_expert"]
        w = c["intermediate_size"] // c["mlp_div_ratio"]
        self.phi = nn.Parameter(torch.randn(h, self.e, self.s) * 0.02)
        self.scale = nn.Parameter(torch.ones(1))
        self.experts = nn.ModuleList([Senet(h, w) for _ in range(self.e)])

    def forward(self, m):
        phi = self.phi.reshape(m.shape[-1], -1)
        phi = self.scale * F.normalize(phi, dim=0)
        x = F.normalize(m, dim=-1)
        logits = x @ phi  # [B, T, E*S]
        d = logits.softmax(dim=1)
        c = logits.softmax(dim=2)
        slots = d.transpose(1, 2) @ x  # [B, E*S, H]
        ys = [ex(slots[:, i * self.s:(i + 1) * self.s]) for i, ex in enumerate(self.experts)]
        return c @ torch.cat(ys, dim=1)


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n1 = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.attn = Attention(c)
        self.n2 = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.mlp = SoftMoE(c)

    def forward(self, x):
        h = x + self.attn(self.n1(x))
        return h + self.mlp(self.n2(h))


class Steel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList([Layer(c) for _ in range(c["num_hidden_layers"])])
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    c = json.load(open(a.model_config))
    model = Steel(c)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05, eps=1e-8)
    g = torch.Generator().manual_seed(1)
    times = []
    for i in range(a.warmup + a.steps):
        blocks = torch.randint(0, c["vocab_size"], (a.batch, a.seq + 1), generator=g)
        t0 = time.perf_counter()
        logits = model(blocks[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1),
                               ignore_index=151643)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
    med = statistics.median(times)
    print(json.dumps({"tokens_per_s": a.batch * a.seq / med, "step_ms": med * 1e3,
                      "threads": a.threads, "torch": torch.__version__,
                      "params": sum(p.numel() for p in model.parameters()), "loss": loss.item()}))


if __name__ == "__main__":
    main()
