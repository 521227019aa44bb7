use super::*;
use steel_runtime::gpu::mma_gemm::{mma_tile_gemm, MMA_BLOCK};

// ---- the mma tile GEMM --------------------------------------------------------------------------

fn check_mma_gemm<G: TestGpu>(
    g: &GpuBackend<G>,
    m: usize,
    n: usize,
    k: usize,
    seed: u64,
) -> Outputs {
    let (a, b) = (
        rand_tensor_dt(&[m, k], DType::BF16, seed),
        rand_tensor_dt(&[n, k], DType::BF16, seed ^ 1),
    );
    // The reference: the same bf16 values in f32, a · bᵀ on the CPU.
    let widen = |t: &Tensor| Tensor::from_f64(&vals(t), t.shape(), DType::F32).unwrap();
    let want = cpu().matmul(&widen(&a), &widen(&b), None, steel_runtime::Matmul::NT, None).unwrap();
    let (ga, gb) = (g.upload(&a).unwrap(), g.upload(&b).unwrap());
    let gc = g.empty(&[m, n], DType::F32).unwrap();
    mma_tile_gemm(g.gpu(), &ga, &gb, &gc).unwrap();
    assert_rel_norm("mma_tile_gemm", &down(g, &gc), &vals(&want), F32_TOL);
    let outs = vec![bits(&down(g, &gc))];
    let Some(log) = g.gpu().launch_log() else { return outs };
    assert_eq!(symbols(&log), ["mma_tile_gemm_bf16"]);
    assert_eq!(log[0].grid, Dim3::xy(n.div_ceil(64) as u32, m.div_ceil(64) as u32));
    assert_eq!(log[0].block, Dim3::x(MMA_BLOCK));
    outs
}

proptest! {
    #![proptest_config(proptest_config(32))]

    #[test]
    fn emu_mma_tile_gemm_matches_cpu(m in 1..=150usize, n in 1..=150usize, k in 1..=70usize, seed in any::<u64>()) {
        on_two_schedules(seed, |g| check_mma_gemm(g, m, n, k, seed));
    }

    #[test]
    fn cuda_mma_tile_gemm_matches_cpu(m in 1..=150usize, n in 1..=150usize, k in 1..=70usize, seed in any::<u64>()) {
        if let Some(g) = cuda() {
            check_mma_gemm(&g, m, n, k, seed);
        }
    }
}
