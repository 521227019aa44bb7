use super::*;
use steel_runtime::gpu::embedding::{accum_block, fwd_block, sort_passes, SCAN_BLOCK, SORT_BLOCK};
use steel_runtime::Error;

// ---- embedding ------------------------------------------------------------------------------------

/// Ids of `n` tokens below `vocab`: uniform, with every `hot_every`-th token (when non-zero) the
/// same hot id, so runs of one id span many tiles and warps of the sort.
fn make_ids(n: usize, vocab: usize, hot_every: usize, seed: u64) -> Vec<i32> {
    let mut ids = rand_ids(n, vocab, seed);
    if hot_every > 0 {
        let hot = (seed % vocab as u64) as i32;
        ids.iter_mut().step_by(hot_every).for_each(|i| *i = hot);
    }
    ids
}

/// An I32 or U32 ids tensor of `shape`.
fn ids_of(ids: &[i32], shape: &[usize], unsigned: bool) -> Tensor {
    if unsigned {
        let u: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        Tensor::from_slice(&u, shape).unwrap()
    } else {
        ids_tensor(ids, shape)
    }
}

/// The forward (F32 and BF16 tables) and the backward (into a random non-zero dtable) against
/// the CPU, bit for bit: the gather is a copy, and the backward adds each row's tokens in the
/// CPU's order (increasing token position).
pub(super) fn check_embedding<G: TestGpu>(
    g: &GpuBackend<G>,
    ids: &[i32],
    ids_shape: &[usize],
    unsigned: bool,
    vocab: usize,
    h: usize,
    seed: u64,
) -> Outputs {
    let c = cpu();
    let n = ids.len();
    let idt = ids_of(ids, ids_shape, unsigned);
    let gids = g.upload(&idt).unwrap();
    let mut out_shape = ids_shape.to_vec();
    out_shape.push(h);
    let mut outs = Outputs::new();

    for dt in [DType::F32, DType::BF16] {
        let table = rand_tensor_dt(&[vocab, h], dt, seed ^ 1);
        let want = c.embedding_fwd(&idt, &table).unwrap();
        let got = g.embedding_fwd(&gids, &g.upload(&table).unwrap()).unwrap();
        assert_eq!(got.shape(), out_shape.as_slice());
        assert_eq!(got.dtype(), dt);
        let got = g.download(&got).unwrap();
        assert_bits_eq(&format!("embedding_fwd {dt}"), &got, &want);
        outs.push(bits(&vals(&got)));
    }

    let dy = f32_rand(&out_shape, seed ^ 2);
    let dtable = f32_rand(&[vocab, h], seed ^ 3);
    let gdtable = g.upload(&dtable).unwrap();
    c.embedding_bwd(&idt, &dy, &dtable).unwrap();
    g.embedding_bwd(&gids, &g.upload(&dy).unwrap(), &gdtable).unwrap();
    let got = g.download(&gdtable).unwrap();
    assert_bits_eq("embedding_bwd dtable", &got, &dtable);
    outs.push(bits(&vals(&got)));

    // The launch log: the gathers, then the radix passes and the accumulation.
    let (Some(log), Some(ranges)) = (g.gpu().launch_log(), g.gpu().nvtx_log()) else { return outs };
    let passes = sort_passes(vocab) as usize;
    let mut want: Vec<&str> = vec!["embedding_fwd_f32", "embedding_fwd_bf16"];
    for _ in 0..passes {
        want.extend([
            "embedding_bwd_hist_u32",
            "embedding_bwd_scan_u32",
            "embedding_bwd_scatter_u32",
        ]);
    }
    want.push("embedding_bwd_accum_f32");
    assert_eq!(symbols(&log), want);
    assert_eq!((log[0].grid, log[0].block), (Dim3::x(n as u32), Dim3::x(fwd_block(h))));
    let tiles = n.div_ceil(SORT_BLOCK as usize) as u32;
    assert_eq!((log[2].grid, log[2].block), (Dim3::x(tiles), Dim3::x(SORT_BLOCK)));
    assert_eq!((log[3].grid, log[3].block), (Dim3::x(1), Dim3::x(SCAN_BLOCK)));
    assert_eq!((log[4].grid, log[4].block), (Dim3::x(tiles), Dim3::x(SORT_BLOCK)));
    let (block, strips) = accum_block(h);
    let last = log.last().unwrap();
    assert_eq!((last.grid, last.block), (Dim3::xy(n as u32, strips as u32), Dim3::x(block)));
    assert_eq!(log[0].nvtx, "embedding_fwd");
    assert_eq!(log[2].nvtx, "embedding_bwd/sort");
    assert_eq!(last.nvtx, "embedding_bwd/accum");
    assert!(ranges.iter().any(|r| r == "embedding_bwd"));
    outs
}

/// Invalid ids (the vocabulary size itself, a negative I32, a huge U32) are refused with the
/// CPU's message (first bad position), by the forward and by the backward, and the backward
/// leaves dtable untouched.
fn check_bad_ids<G: TestGpu>(g: &GpuBackend<G>, seed: u64) {
    let c = cpu();
    let (vocab, h) = (37, 13);
    let mut cases = vec![];
    for (pos, bad, unsigned) in
        [(5, 37i64, false), (0, -1, false), (9, 37, true), (3, 1 << 31, true)]
    {
        let mut ids = make_ids(11, vocab, 0, seed);
        ids[pos] = bad as i32;
        ids[10] = vocab as i32 + 5; // a later bad id: the first one is reported
        cases.push((ids_of(&ids, &[11], unsigned), pos));
    }
    let table = f32_rand(&[vocab, h], seed ^ 1);
    let gtable = g.upload(&table).unwrap();
    for (idt, pos) in cases {
        let gids = g.upload(&idt).unwrap();
        let want = c.embedding_fwd(&idt, &table).unwrap_err().to_string();
        let got = g.embedding_fwd(&gids, &gtable).unwrap_err();
        assert!(matches!(got, Error::Invalid { op: "embedding_fwd", .. }), "{got}");
        assert_eq!(got.to_string(), want);
        assert!(want.contains(&format!("at position {pos} ")), "{want}");

        let dy = f32_rand(&[11, h], seed ^ 2);
        let dtable = f32_rand(&[vocab, h], seed ^ 3);
        let gdtable = g.upload(&dtable).unwrap();
        let want = c.embedding_bwd(&idt, &dy, &dtable.deep_copy().unwrap()).unwrap_err();
        let got = g.embedding_bwd(&gids, &g.upload(&dy).unwrap(), &gdtable).unwrap_err();
        assert!(matches!(got, Error::Invalid { op: "embedding_bwd", .. }), "{got}");
        assert_eq!(got.to_string(), want.to_string());
        assert_bits_eq("dtable after a refused backward", &g.download(&gdtable).unwrap(), &dtable);
    }
    if let Some(log) = g.gpu().launch_log() {
        assert!(!symbols(&log).contains(&"embedding_bwd_accum_f32"), "accumulated after an error");
    }
}

/// Dtype combinations outside the policy are `Error::dtype` naming the op.
fn check_bad_dtypes<G: TestGpu>(g: &GpuBackend<G>) {
    let up = |t: Tensor| g.upload(&t).unwrap();
    let ids16 = up(Tensor::from_slice(&[1u16, 2], &[2]).unwrap());
    let ids = up(ids_tensor(&[1, 2], &[2]));
    let table = up(f32_rand(&[4, 3], 1));
    let table_i = up(ids_tensor(&[0; 12], &[4, 3]));
    let dy16 = up(rand_tensor_dt(&[2, 3], DType::BF16, 2));
    let dtable16 = up(rand_tensor_dt(&[4, 3], DType::BF16, 3));
    let dy = up(f32_rand(&[2, 3], 4));
    let is_dtype = |r: Result<(), Error>, op: &str| {
        assert!(matches!(&r, Err(Error::DType { op: o, .. }) if *o == op), "{op}: {r:?}");
    };
    is_dtype(g.embedding_fwd(&ids16, &table).map(drop), "embedding_fwd");
    is_dtype(g.embedding_fwd(&ids, &table_i).map(drop), "embedding_fwd");
    is_dtype(g.embedding_bwd(&ids, &dy16, &table), "embedding_bwd");
    is_dtype(g.embedding_bwd(&ids, &dy, &dtable16), "embedding_bwd");
    is_dtype(g.embedding_bwd(&ids16, &dy, &table), "embedding_bwd");
    let r = g.embedding_bwd(&ids, &up(f32_rand(&[2, 4], 5)), &table);
    assert!(matches!(r, Err(Error::Shape { op: "embedding_bwd", .. })), "{r:?}");
}

/// The fixed cases: the model's widths (1792, 448), a hot token repeated 500 times among 600,
/// and the 151,936-row vocabulary sampled sparsely (3 radix passes, ids at both ends).
fn fixed_cases() -> Vec<(Vec<i32>, Vec<usize>, usize, usize)> {
    let mut sparse = make_ids(38, 151_936, 0, 7);
    sparse.extend([0, 151_935]);
    let hot: Vec<i32> = (0..600).map(|i| if i % 6 == 5 { i * 13 % 1000 } else { 417 }).collect();
    vec![
        (make_ids(45, 300, 4, 1), vec![5, 9], 300, 1792),
        (make_ids(70, 257, 3, 2), vec![70], 257, 448),
        (hot, vec![2, 300], 1000, 40),
        (sparse, vec![40], 151_936, 8),
    ]
}

#[test]
fn emu_embedding_fixed_cases() {
    for (i, (ids, shape, vocab, h)) in fixed_cases().into_iter().enumerate() {
        let seed = 100 + i as u64;
        on_two_schedules(seed, |g| check_embedding(g, &ids, &shape, i % 2 == 1, vocab, h, seed));
    }
    assert_eq!(sort_passes(151_936), 3);
    assert_eq!((sort_passes(256), sort_passes(257), sort_passes(1)), (1, 2, 1));
    assert_eq!(fwd_block(1792), 128);
}

#[test]
fn cuda_embedding_fixed_cases() {
    if let Some(g) = cuda() {
        for (i, (ids, shape, vocab, h)) in fixed_cases().into_iter().enumerate() {
            check_embedding(&g, &ids, &shape, i % 2 == 1, vocab, h, 100 + i as u64);
        }
    }
}

#[test]
fn emu_embedding_refuses_bad_ids_and_dtypes() {
    check_bad_ids(&emu(), 5);
    check_bad_dtypes(&emu());
}

#[test]
fn cuda_embedding_refuses_bad_ids_and_dtypes() {
    if let Some(g) = cuda() {
        check_bad_ids(&g, 5);
        check_bad_dtypes(&g);
    }
}

proptest! {
    #![proptest_config(proptest_config(24))]

    #[test]
    fn emu_embedding_fwd_bwd_matches_cpu(b in 1..=3usize, t in 1..=260usize, vocab in 1..=3000usize, h in 1..=70usize, hot_every in 0..=4usize, unsigned in any::<bool>(), seed in any::<u64>()) {
        let ids = make_ids(b * t, vocab, hot_every, seed);
        on_two_schedules(seed, |g| check_embedding(g, &ids, &[b, t], unsigned, vocab, h, seed));
    }

    #[test]
    fn cuda_embedding_fwd_bwd_matches_cpu(b in 1..=3usize, t in 1..=260usize, vocab in 1..=3000usize, h in 1..=70usize, hot_every in 0..=4usize, unsigned in any::<bool>(), seed in any::<u64>()) {
        if let Some(g) = cuda() {
            let ids = make_ids(b * t, vocab, hot_every, seed);
            check_embedding(&g, &ids, &[b, t], unsigned, vocab, h, seed);
        }
    }
}
