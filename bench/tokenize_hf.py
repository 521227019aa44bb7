"""HF `tokenizers` (Python) throughput on the same documents as `steel-bench tokenize`.

Run in its own venv (never a product dependency):
    python3 -m venv .venv-bench && .venv-bench/bin/pip install tokenizers
    RAYON_RS_NUM_CPUS=2 .venv-bench/bin/python bench/tokenize_hf.py \
        --tokenizer ../shared/data/qwen-tokenizer/tokenizer.json --input DOCS.jsonl --threads 2
Prints one JSON line like steel-bench's: median seconds over the repeats and tokens/s.
"""
import argparse
import json
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    # tokenizers sizes its rayon pool from this variable; it must be set before the import.
    os.environ["RAYON_RS_NUM_CPUS"] = str(a.threads)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(a.tokenizer)
    docs = []
    with open(a.input, encoding="utf-8") as f:
        for line in f:
            try:
                docs.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError):
                pass
    tok.encode_batch(docs)  # warm-up
    times, tokens = [], 0
    for _ in range(a.repeats):
        t = time.perf_counter()
        enc = tok.encode_batch(docs)
        times.append(time.perf_counter() - t)
        tokens = sum(len(e.ids) for e in enc)
    med = statistics.median(times)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    print(json.dumps({
        "implementation": "HF tokenizers (Python, encode_batch)",
        "threads": a.threads,
        "documents": len(docs),
        "tokens": tokens,
        "median_s": med,
        "tokens_per_s": tokens / med,
        "mb_per_s": nbytes / med / 1e6,
    }))


if __name__ == "__main__":
    main()
