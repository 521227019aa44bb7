// Token embedding: a row gather forward, a deterministic scatter-add backward (no float atomics).
// Reference: runtime/src/cpu/embedding.rs. Launchers: runtime/src/gpu/embedding.rs.
//
// Ids are 32-bit words (I32 or U32, `IdKind`); an id is valid when it lies in 0..vocab (an I32
// id below zero never is). A kernel that meets an invalid id never dereferences it: it records
// the smallest such token position in `err` (integer atomicMin; the launcher memsets it to
// 0xffffffff and downloads it) and skips the token.
//
// Forward (`embedding_fwd_<f32|bf16>`): block i copies table row ids[i] to out row i (blocks
// stride over the tokens). A row whose source and destination both start on 16 bytes is copied
// with 128-bit vectors (steel_vec.cuh) plus a scalar tail; any other row element by element.
//
// Backward: `dtable[ids[i]] += dy[i]`, each vocabulary row summed in increasing token order,
// exactly as the CPU reference (so the result is bit-identical to it):
//   1. an LSD radix sort of the token positions by id, RADIX_BITS per pass, as many passes as
//      the vocabulary needs (3 for 151,936). Each pass is stable:
//      - `embedding_bwd_hist_u32`: one block per tile of SORT_BLOCK keys counts the keys of each
//        digit (`hist[digit][tile]`); on the first pass it also validates the ids;
//      - `embedding_bwd_scan_u32`: one block turns `hist`, digit-major, into exclusive offsets;
//      - `embedding_bwd_scatter_u32`: each tile writes its positions at offset + stable rank.
//      A key's rank inside its tile is computed without atomics: the lanes of a warp holding the
//      same digit find each other with RADIX_BITS ballots (rank = peers in lower lanes), and the
//      per-warp counts of each digit, in shared memory, give the keys of the same digit held by
//      lower warps. Integer counts: no order question arises.
//   2. `embedding_bwd_accum_f32`: grid (sorted position, column strip). The block at the first
//      position of each id's run (a "head") sums that id's rows of dy in order into registers
//      starting from dtable's value, one column per thread, and writes it back once; every other
//      block returns at once. One writer per dtable element: no atomics, no races.
#include "steel_vec.cuh"

// How an id word is read (mirrors `IdKind` in runtime/src/gpu/embedding.rs).
enum IdKind : unsigned { ID_I32 = 0, ID_U32 = 1 };

static __device__ __forceinline__ bool valid_id(unsigned word, unsigned kind, u64 vocab) {
#ifdef STEEL_MUTATE_EMBEDDING_OOB
    // test-only breakage: the id equal to the vocabulary size passes (reads one row past the end)
    return (kind == ID_U32 || (int)word >= 0) && (u64)word <= vocab;
#else
    return (kind == ID_U32 || (int)word >= 0) && (u64)word < vocab;
#endif
}

// ---- forward ------------------------------------------------------------------------------------

struct EmbeddingFwdParams {
    const unsigned* ids;  // (n) I32 or U32 words
    const void* table;    // (vocab, h) of T
    void* out;            // (n, h) of T
    unsigned* err;        // (1) smallest position of an invalid id, else untouched
    u64 n;
    u64 vocab;
    u64 h;
    unsigned kind;  // IdKind
    unsigned pad_;
};
STEEL_PARAMS_SIZE(EmbeddingFwdParams, 64);

template <typename T>
static __device__ __forceinline__ void embedding_fwd(const EmbeddingFwdParams& p) {
    const T* table = static_cast<const T*>(p.table);
    T* out = static_cast<T*>(p.out);
#ifdef STEEL_MUTATE_EMBEDDING_FWD
    const u64 h = p.h - 1;  // test-only breakage: the last column of every row is not copied
#else
    const u64 h = p.h;
#endif
    constexpr int N = Vec<T>::N;
    for (u64 i = blockIdx.x; i < p.n; i += gridDim.x) {
        const unsigned word = p.ids[i];
        if (!valid_id(word, p.kind, p.vocab)) {
            if (threadIdx.x == 0) atomicMin(p.err, (unsigned)i);
            continue;
        }
        const T* src = table + (u64)word * p.h;
        T* dst = out + i * p.h;
        u64 j0 = 0;
        if (is_aligned16(src) && is_aligned16(dst)) {
            const u64 vecs = h / N;
            for (u64 k = threadIdx.x; k < vecs; k += blockDim.x) {
                float v[N];
                ld_vec(src + k * N, v);
                st_vec(dst + k * N, v);
            }
            j0 = vecs * N;
        }
        for (u64 j = j0 + threadIdx.x; j < h; j += blockDim.x) st_f32(dst, j, ld_f32(src, j));
    }
}

extern "C" __global__ void __launch_bounds__(128) embedding_fwd_f32(const EmbeddingFwdParams p) {
    embedding_fwd<float>(p);
}
extern "C" __global__ void __launch_bounds__(128) embedding_fwd_bf16(const EmbeddingFwdParams p) {
    embedding_fwd<bf16_t>(p);
}

// ---- backward: the stable radix sort of token positions by id -----------------------------------

constexpr int SORT_BLOCK = 256;  // threads of the hist and scatter kernels = keys per tile
constexpr int SORT_WARPS = SORT_BLOCK / 32;
constexpr int RADIX_BITS = 8;
constexpr int BUCKETS = 1 << RADIX_BITS;
static_assert(BUCKETS == SORT_BLOCK, "one thread per digit sums the warps' counts");
static_assert(SORT_WARPS * BUCKETS * 4 <= 48 * 1024, "the per-warp digit counts fit shared memory");
constexpr int SCAN_BLOCK = 1024;  // threads of the one-block offset scan

// The token position held at sorted position q of the previous pass (`src` null: q itself).
static __device__ __forceinline__ unsigned token_at(const unsigned* src, u64 q) {
    return src ? src[q] : (unsigned)q;
}

// The stable rank of this thread's key among the keys of the tile with the same digit (keys of
// lower threads come first). `counts` is STEEL_SHARED unsigned[SORT_WARPS * BUCKETS]; on return
// it holds, per warp and digit, how many of the warp's valid keys have that digit. Every thread
// of the block calls it (it has barriers); `valid` is false past the last key.
static __device__ __forceinline__ unsigned tile_rank(bool valid, unsigned digit, unsigned* counts) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int k = threadIdx.x; k < SORT_WARPS * BUCKETS; k += blockDim.x) counts[k] = 0;
    // The lanes of this warp whose key has the same digit (all lanes vote on every bit).
    unsigned peers = __ballot_sync(STEEL_FULL_MASK, valid);
    for (int b = 0; b < RADIX_BITS; ++b) {
        const bool bit = (digit >> b) & 1u;
        const unsigned set = __ballot_sync(STEEL_FULL_MASK, bit);
        peers &= bit ? set : ~set;
    }
#ifdef STEEL_MUTATE_EMBEDDING_SORT
    // test-only breakage: peers ranked from the top lane down (a permutation, but not stable)
    const unsigned below = peers & ~((2u << lane) - 1u);
#else
    const unsigned below = peers & ((1u << lane) - 1u);
#endif
    __syncthreads();  // why: the counts are zeroed before any warp writes its own
    if (valid && below == 0) counts[warp * BUCKETS + digit] = __popc(peers);
    __syncthreads();  // why: every warp's counts are written before any thread reads them
    unsigned rank = __popc(below);
    if (valid)
        for (int w = 0; w < warp; ++w) rank += counts[w * BUCKETS + digit];
    return rank;
}

struct EmbeddingHistParams {
    const unsigned* ids;  // (n) I32 or U32 words
    const unsigned* src;  // (n) token positions in the previous pass's order, or null (0..n)
    unsigned* hist;       // (BUCKETS, tiles): keys per digit and tile
    unsigned* err;        // (1) smallest position of an invalid id; null after the first pass
    u64 n;
    u64 vocab;
    unsigned shift;  // the digit is (id >> shift) & (BUCKETS − 1)
    unsigned kind;   // IdKind
};
STEEL_PARAMS_SIZE(EmbeddingHistParams, 56);

// grid (tiles), block SORT_BLOCK: tile = keys [tile · SORT_BLOCK, +SORT_BLOCK).
extern "C" __global__ void __launch_bounds__(SORT_BLOCK) embedding_bwd_hist_u32(const EmbeddingHistParams p) {
    STEEL_SHARED(unsigned, counts, SORT_WARPS * BUCKETS);
    const u64 q = (u64)blockIdx.x * SORT_BLOCK + threadIdx.x;
    const bool valid = q < p.n;
    const unsigned word = valid ? p.ids[token_at(p.src, q)] : 0u;
    if (valid && p.err && !valid_id(word, p.kind, p.vocab)) atomicMin(p.err, (unsigned)q);
    const unsigned digit = (word >> p.shift) & (BUCKETS - 1);
    (void)tile_rank(valid, digit, counts);
    unsigned total = 0;
    for (int w = 0; w < SORT_WARPS; ++w) total += counts[w * BUCKETS + threadIdx.x];
    p.hist[(u64)threadIdx.x * gridDim.x + blockIdx.x] = total;
}

struct EmbeddingScanParams {
    unsigned* hist;  // (len): counts in, exclusive prefix sums out
    u64 len;
};
STEEL_PARAMS_SIZE(EmbeddingScanParams, 16);

// One block: thread t owns the contiguous run [t · per, (t + 1) · per) of `hist`.
extern "C" __global__ void __launch_bounds__(SCAN_BLOCK) embedding_bwd_scan_u32(const EmbeddingScanParams p) {
    STEEL_SHARED(unsigned, warp_total, 32);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const u64 per = (p.len + blockDim.x - 1) / blockDim.x;
    const u64 b = min((u64)threadIdx.x * per, p.len), e = min(b + per, p.len);
    unsigned own = 0;
    for (u64 i = b; i < e; ++i) own += p.hist[i];
    unsigned inc = own;  // inclusive scan over the warp's lanes
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned t = __shfl_up_sync(STEEL_FULL_MASK, inc, o);
        if (lane >= o) inc += t;
    }
    if (lane == 31) warp_total[warp] = inc;
    __syncthreads();  // why: every warp's total is written before warp 0 scans them
    if (warp == 0) {
        const unsigned t = lane < warps ? warp_total[lane] : 0u;
        unsigned s = t;
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned u = __shfl_up_sync(STEEL_FULL_MASK, s, o);
            if (lane >= o) s += u;
        }
        if (lane < warps) warp_total[lane] = s - t;  // exclusive: the keys of lower warps
    }
    __syncthreads();  // why: the warps' offsets are written before any warp reads its own
    unsigned run = warp_total[warp] + inc - own;
    for (u64 i = b; i < e; ++i) {
        const unsigned c = p.hist[i];
        p.hist[i] = run;
        run += c;
    }
}

struct EmbeddingScatterParams {
    const unsigned* ids;   // (n) I32 or U32 words
    const unsigned* src;   // (n) token positions in the previous pass's order, or null (0..n)
    unsigned* dst;         // (n) token positions in this pass's order
    const unsigned* hist;  // (BUCKETS, tiles): exclusive offsets of each digit and tile
    u64 n;
    unsigned shift;
    unsigned pad_;
};
STEEL_PARAMS_SIZE(EmbeddingScatterParams, 48);

// grid (tiles), block SORT_BLOCK, the tiles of embedding_bwd_hist_u32.
extern "C" __global__ void __launch_bounds__(SORT_BLOCK) embedding_bwd_scatter_u32(const EmbeddingScatterParams p) {
    STEEL_SHARED(unsigned, counts, SORT_WARPS * BUCKETS);
    const u64 q = (u64)blockIdx.x * SORT_BLOCK + threadIdx.x;
    const bool valid = q < p.n;
    const unsigned tok = valid ? token_at(p.src, q) : 0u;
    const unsigned word = valid ? p.ids[tok] : 0u;
    const unsigned digit = (word >> p.shift) & (BUCKETS - 1);
    const unsigned rank = tile_rank(valid, digit, counts);
    if (valid) p.dst[p.hist[(u64)digit * gridDim.x + blockIdx.x] + rank] = tok;
}

// ---- backward: the per-id sums ------------------------------------------------------------------

struct EmbeddingAccumParams {
    const unsigned* ids;    // (n) I32 or U32 words, all valid (the launcher checked `err`)
    const unsigned* order;  // (n) token positions sorted by id, stable
    const float* dy;        // (n, h)
    float* dtable;          // (vocab, h), accumulated
    u64 n;
    u64 vocab;
    u64 h;
    unsigned kind;  // IdKind
    unsigned pad_;
};
STEEL_PARAMS_SIZE(EmbeddingAccumParams, 64);

// grid (n, ceil(h / blockDim.x)): block (q, s) handles columns [s · blockDim.x, +blockDim.x) of
// the id at sorted position q when q starts that id's run.
extern "C" __global__ void __launch_bounds__(256) embedding_bwd_accum_f32(const EmbeddingAccumParams p) {
    const u64 q = blockIdx.x;
    const unsigned v = p.ids[p.order[q]];
    if (q > 0 && p.ids[p.order[q - 1]] == v) return;  // not the head of its run
    if (!valid_id(v, p.kind, p.vocab)) return;         // never written out of bounds
    const u64 j = (u64)blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= p.h) return;
    float* row = p.dtable + (u64)v * p.h;
    float acc = row[j];
#ifdef STEEL_MUTATE_EMBEDDING_BWD
    u64 e = q + 1;  // test-only breakage: the first token of every id is left out
#else
    u64 e = q;
#endif
    for (; e < p.n; ++e) {
        const unsigned tok = p.order[e];
        if (p.ids[tok] != v) break;
        acc += p.dy[(u64)tok * p.h + j];
    }
    row[j] = acc;
}
