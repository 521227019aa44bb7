use super::*;

// ---- layout: transpose01, slice0 (+ backward), concat0 ----------------------------------------

/// Every layout op on `[a, b, c]` of `dtype` against the CPU backend. Moves are exact (bit for
/// bit); slice0_bwd accumulates (F32 exactly as the CPU; BF16 rounds once per element, as the
/// CPU reference does).
fn check_layout<G: TestGpu>(
    g: &GpuBackend<G>,
    (a, b, c): (usize, usize, usize),
    dtype: DType,
    start: usize,
    seed: u64,
) -> Outputs {
    let cb = cpu();
    let x = rand_tensor_dt(&[a, b, c], dtype, seed);
    let gx = g.upload(&x).unwrap();
    let mut outs = Outputs::new();
    let mut exact = |what: &str, got: &Tensor, want: &Tensor| {
        assert_eq!((got.shape(), got.dtype()), (want.shape(), want.dtype()), "{what}");
        let v = down(g, got);
        assert_eq!(bits(&v), bits(&vals(want)), "{what} must move values exactly");
        outs.push(bits(&v));
    };
    exact("transpose01 3-D", &g.transpose01(&gx).unwrap(), &cb.transpose01(&x).unwrap());
    let x2 = rand_tensor_dt(&[a, b * c], dtype, seed ^ 1);
    let gx2 = g.upload(&x2).unwrap();
    exact("transpose01 2-D", &g.transpose01(&gx2).unwrap(), &cb.transpose01(&x2).unwrap());
    let start = start % a;
    let len = (a - start).min(1 + seed as usize % a);
    exact("slice0", &g.slice0(&gx, start, len).unwrap(), &cb.slice0(&x, start, len).unwrap());
    let y = rand_tensor_dt(&[len + 1, b, c], dtype, seed ^ 2);
    let gy = g.upload(&y).unwrap();
    exact("concat0", &g.concat0(&[&gx, &gy, &gx]).unwrap(), &cb.concat0(&[&x, &y, &x]).unwrap());

    // slice0_bwd at a row offset (often not 16-byte aligned: the kernel's scalar path).
    let dy = rand_tensor_dt(&[len, b, c], dtype, seed ^ 3);
    let dx = rand_tensor_dt(&[a, b, c], dtype, seed ^ 4);
    let gdx = g.upload(&dx).unwrap();
    cb.slice0_bwd(&dy, &dx, start).unwrap();
    g.slice0_bwd(&g.upload(&dy).unwrap(), &gdx, start).unwrap();
    exact("slice0_bwd", &gdx, &dx);
    outs
}

proptest! {
    #![proptest_config(proptest_config(24))]

    #[test]
    fn emu_layout_matches_cpu(a in 1..=6usize, b in 1..=7usize, c in 1..=40usize, bf16 in any::<bool>(), start in 0..6usize, seed in any::<u64>()) {
        let dtype = if bf16 { DType::BF16 } else { DType::F32 };
        on_two_schedules(seed, |g| check_layout(g, (a, b, c), dtype, start, seed));
    }

    #[test]
    fn cuda_layout_matches_cpu(a in 1..=6usize, b in 1..=7usize, c in 1..=40usize, bf16 in any::<bool>(), start in 0..6usize, seed in any::<u64>()) {
        if let Some(g) = cuda() {
            let dtype = if bf16 { DType::BF16 } else { DType::F32 };
            check_layout(&g, (a, b, c), dtype, start, seed);
        }
    }
}

/// The vector path (rows of whole 16-byte units) and the element paths, by kernel name; the
/// model's widths and integer ids.
#[test]
fn emu_layout_kernels_by_row_width() {
    let g = emu();
    for (c, dtype, want) in [
        (8, DType::BF16, "transpose01_v16"),
        (4, DType::F32, "transpose01_v16"),
        (1792, DType::F32, "transpose01_v16"),
        (448, DType::BF16, "transpose01_v16"),
        (7, DType::BF16, "transpose01_u16"),
        (3, DType::F32, "transpose01_u32"),
    ] {
        let x = g.upload(&rand_tensor_dt(&[3, 2, c], dtype, c as u64)).unwrap();
        let before = g.gpu().launches().len();
        g.transpose01(&x).unwrap();
        assert_eq!(g.gpu().launches()[before].symbol, want, "c = {c}, {dtype}");
    }
    on_two_schedules(30, |g| check_layout(g, (3, 2, 1792), DType::F32, 1, 30));
    on_two_schedules(31, |g| check_layout(g, (5, 3, 448), DType::BF16, 2, 31));
    let ids = ids_tensor(&[1, 2, 3, 4, 5, 6], &[2, 3]);
    let t = g.transpose01(&g.upload(&ids).unwrap()).unwrap();
    assert_eq!(g.download(&t).unwrap().to_vec::<i32>().unwrap(), [1, 4, 2, 5, 3, 6]);
}
