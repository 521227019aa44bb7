// The device's floating point, as the kernels see it under the emulator (DESIGN §4): included
// into every kernel unit after shim.h (build.rs), never into the emulator's runtime, and never
// seen by NVRTC.
//
// NVRTC compiles our kernels with its defaults: --fmad=true (multiply-adds contract), --ftz=false
// (no flush to zero), --prec-div=true and --prec-sqrt=true (IEEE division and square root). The
// emulator matches them: build.rs compiles the kernels with -mfma -ffp-contract=fast, and the
// functions below follow the CUDA Math API's documented accuracy instead of being exact:
// - full-precision functions (expf 2 ulp, logf 1 ulp, …) return a float within their documented
//   error of the exact value, chosen deterministically from the argument's bits (so kernels stay
//   deterministic, but are not bit-identical to a CPU reference that rounds exactly);
// - intrinsics are built as the device builds them: __expf(x) is ex2.approx(x · log2 e) of the
//   *rounded* product (hence its documented 2 + ⌊1.173·|x|⌋ ulp), __logf(x) is lg2.approx(x) · ln 2,
//   __fdividef(a, b) is 0 for 2^126 < |b| < 2^128 and a · rcp.approx(b) otherwise, rsqrtf is
//   rsqrt.approx (2 ulp), __sinf/__cosf have the absolute error of sin.approx/cos.approx;
// - correctly rounded operations stay exact: sqrtf, division, __frcp_rn, __fsqrt_rn, __fdiv_rn,
//   and __fmul_rn / __fadd_rn never contract into a multiply-add.
// The CPU reference (runtime/src/cpu) stays exact: tolerances (fp32 ≤ 1e-5) are what absorb this.
#pragma once
#include <cmath>
#include <cstdint>

namespace steel_emu {
namespace dev {

// Function identities, so two functions of one argument err independently.
enum : uint32_t { kExp = 1, kExp2, kExp10, kExpm1, kLog, kLog2, kLog10, kLog1p, kSin, kCos, kTan,
                  kTanh, kRsqrt, kEx2, kLg2, kRcp, kErf, kPow };

static inline uint32_t mix(uint32_t a, uint32_t b) {
    uint32_t h = a * 0x9E3779B1u ^ (b + 0x7F4A7C15u);
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    return h;
}

static inline uint32_t bits_of(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
}

// A float within `ulps` units in the last place of the exact value `e` (ulps ≥ 1: one of the
// 2·ulps floats nearest to e; 0: e correctly rounded), chosen by `key`.
static inline float within_ulps(double e, uint32_t key, int ulps) {
    const float rn = (float)e;
    if (ulps == 0 || !std::isfinite(rn) || e == 0.0 || std::isnan(e)) return rn;
    // lo ≤ e ≤ hi: the two floats around e.
    float lo = rn, hi = rn;
    if ((double)rn > e) lo = std::nextafter(rn, -INFINITY);
    if ((double)rn < e) hi = std::nextafter(rn, INFINITY);
    if (lo == hi) hi = std::nextafter(rn, INFINITY);  // e is a float: its neighbours are 1 ulp off
    const int n = 2 * ulps, k = (int)(key % (uint32_t)n) - (ulps - 1) - 1;  // -ulps .. ulps-1
    float r = k < 0 ? lo : hi;
    for (int i = 0; i < (k < 0 ? -k - 1 : k); ++i) r = std::nextafter(r, k < 0 ? -INFINITY : INFINITY);
    // Across a binade the steps change size: never leave `ulps` of the local spacing around e.
    const double spacing = (double)hi - (double)lo;
    return std::isfinite(r) && std::fabs((double)r - e) <= ulps * spacing ? r : rn;
}

static inline float approx(double e, float arg, uint32_t fn, int ulps) {
    return within_ulps(e, mix(bits_of(arg), fn), ulps);
}

// A product or sum rounded on its own: never contracted into a multiply-add (the empty asm
// statements hide the operands and the result from the optimiser, so the operation can neither
// fuse with its neighbours nor be shared with a contractible twin).
static inline float mul_rn(float a, float b) {
    __asm__("" : "+x"(a));
    float r = a * b;
    __asm__("" : "+x"(r));
    return r;
}
static inline float add_rn(float a, float b) {
    __asm__("" : "+x"(a));
    float r = a + b;
    __asm__("" : "+x"(r));
    return r;
}

// The special-function unit's approximations, as the documented bounds of the intrinsics built
// on them allow: ex2.approx and lg2.approx within 1 ulp (__expf's 2 + ⌊1.173·|x|⌋ ulp are ex2's
// error plus the rounded product's; __logf's 3 ulp outside [0.5, 2] lg2's plus the product with
// ln 2), rcp.approx correctly rounded (__fdividef's 2 ulp are the reciprocal's and the product's
// rounding together).
static inline float ex2_approx(float y) { return approx(std::exp2((double)y), y, kEx2, 1); }
static inline float lg2_approx(float x) {
    if (x < 0.0f) return NAN;
    if (x == 0.0f) return -INFINITY;
    return approx(std::log2((double)x), x, kLg2, 1);
}
static inline float rcp_approx(float x) { return approx(1.0 / (double)x, x, kRcp, 0); }

}  // namespace dev
}  // namespace steel_emu

// ---- full-precision functions (CUDA Math API accuracy table, single precision) ------------------
#define STEEL_DEV_FN1(name, fn, expr, ulps)                                          \
    static inline float steel_dev_##name(float x) {                                  \
        return steel_emu::dev::approx((expr), x, steel_emu::dev::fn, (ulps));        \
    }
STEEL_DEV_FN1(expf, kExp, std::exp((double)x), 2)
STEEL_DEV_FN1(exp2f, kExp2, std::exp2((double)x), 2)
STEEL_DEV_FN1(exp10f, kExp10, std::pow(10.0, (double)x), 2)
STEEL_DEV_FN1(expm1f, kExpm1, std::expm1((double)x), 1)
STEEL_DEV_FN1(logf, kLog, std::log((double)x), 1)
STEEL_DEV_FN1(log2f, kLog2, std::log2((double)x), 1)
STEEL_DEV_FN1(log10f, kLog10, std::log10((double)x), 2)
STEEL_DEV_FN1(log1pf, kLog1p, std::log1p((double)x), 1)
STEEL_DEV_FN1(sinf, kSin, std::sin((double)x), 2)
STEEL_DEV_FN1(cosf, kCos, std::cos((double)x), 2)
STEEL_DEV_FN1(tanf, kTan, std::tan((double)x), 4)
STEEL_DEV_FN1(tanhf, kTanh, std::tanh((double)x), 2)
STEEL_DEV_FN1(erff, kErf, std::erf((double)x), 2)
#undef STEEL_DEV_FN1
static inline float steel_dev_powf(float x, float y) {
    return steel_emu::dev::within_ulps(std::pow((double)x, (double)y),
                                       steel_emu::dev::mix(steel_emu::dev::bits_of(x),
                                                           steel_emu::dev::bits_of(y) ^ steel_emu::dev::kPow),
                                       4);
}
static inline void steel_dev_sincosf(float x, float* s, float* c) {
    *s = steel_dev_sinf(x);
    *c = steel_dev_cosf(x);
}
// rsqrt.approx.f32 (2 ulp).
static inline float rsqrtf(float x) {
    if (x < 0.0f) return NAN;
    if (x == 0.0f) return std::copysign(INFINITY, x);
    return steel_emu::dev::approx(1.0 / std::sqrt((double)x), x, steel_emu::dev::kRsqrt, 2);
}

// ---- intrinsics ---------------------------------------------------------------------------------
static inline float steel_dev_fast_expf(float x) {
    return steel_emu::dev::ex2_approx(steel_emu::dev::mul_rn(x, 1.44269504088896341f));
}
static inline float steel_dev_fast_exp10f(float x) {
    return steel_emu::dev::ex2_approx(steel_emu::dev::mul_rn(x, 3.32192809488736235f));
}
static inline float steel_dev_fast_log2f(float x) { return steel_emu::dev::lg2_approx(x); }
static inline float steel_dev_fast_logf(float x) {
    return steel_emu::dev::mul_rn(steel_emu::dev::lg2_approx(x), 0.693147180559945309f);
}
static inline float steel_dev_fast_log10f(float x) {
    return steel_emu::dev::mul_rn(steel_emu::dev::lg2_approx(x), 0.301029995663981195f);
}
// sin.approx / cos.approx: absolute error up to 2^-21.41 on [-π, π]; the emulator errs by up to
// 2^-22, decided by the argument.
static inline float steel_dev_fast_sinf(float x) {
    const double e = std::sin((double)x);
    const uint32_t h = steel_emu::dev::mix(steel_emu::dev::bits_of(x), steel_emu::dev::kSin);
    return (float)(e + std::ldexp(((double)(h & 0xff) - 127.5) / 127.5, -22));
}
static inline float steel_dev_fast_cosf(float x) {
    const double e = std::cos((double)x);
    const uint32_t h = steel_emu::dev::mix(steel_emu::dev::bits_of(x), steel_emu::dev::kCos);
    return (float)(e + std::ldexp(((double)(h & 0xff) - 127.5) / 127.5, -22));
}
static inline float steel_dev_fast_tanf(float x) { return steel_dev_fast_sinf(x) / steel_dev_fast_cosf(x); }
static inline float steel_dev_fdividef(float a, float b) {
    const float ab = std::fabs(b);
    if (ab > 0x1p126f && std::isfinite(ab)) return std::isinf(a) ? NAN : 0.0f;
    return steel_emu::dev::mul_rn(a, steel_emu::dev::rcp_approx(b));
}
static inline float __frcp_rn(float x) { return (float)(1.0 / (double)x); }
static inline float __fsqrt_rn(float x) { return std::sqrt(x); }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmul_rn(float a, float b) { return steel_emu::dev::mul_rn(a, b); }
static inline float __fadd_rn(float a, float b) { return steel_emu::dev::add_rn(a, b); }
static inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

// The kernels' spellings. (glibc declares __expf and friends itself: the macros take precedence
// in the kernels, which include nothing after this header but our own.)
#define expf steel_dev_expf
#define exp2f steel_dev_exp2f
#define exp10f steel_dev_exp10f
#define expm1f steel_dev_expm1f
#define logf steel_dev_logf
#define log2f steel_dev_log2f
#define log10f steel_dev_log10f
#define log1pf steel_dev_log1pf
#define sinf steel_dev_sinf
#define cosf steel_dev_cosf
#define tanf steel_dev_tanf
#define tanhf steel_dev_tanhf
#define erff steel_dev_erff
#define powf steel_dev_powf
#define sincosf steel_dev_sincosf
#define __expf steel_dev_fast_expf
#define __exp10f steel_dev_fast_exp10f
#define __logf steel_dev_fast_logf
#define __log2f steel_dev_fast_log2f
#define __log10f steel_dev_fast_log10f
#define __sinf steel_dev_fast_sinf
#define __cosf steel_dev_fast_cosf
#define __tanf steel_dev_fast_tanf
#define __fdividef steel_dev_fdividef
