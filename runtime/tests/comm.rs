//! The in-process communicator: every collective against a direct computation, results
//! bit-identical on all ranks, and shape errors reported on every rank (never a hang).

use std::thread;
use steel_runtime::comm::{Communicator, InProcessComm, ReduceOp};
use steel_runtime::Tensor;

/// Rank r's data: n values in ±[0.1, 1.1) that differ per rank.
fn data(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = ((i * 7 + rank * 13) % 17) as f32 / 17.0 + 0.1;
            if (i + rank).is_multiple_of(2) {
                v
            } else {
                -v
            }
        })
        .collect()
}

/// Runs `f` on every rank of a group of `world` threads and collects the results in rank order.
fn on_ranks<R: Send + 'static>(
    world: usize,
    f: impl Fn(&mut InProcessComm) -> R + Send + Sync + Copy + 'static,
) -> Vec<R> {
    let handles: Vec<_> = InProcessComm::group(world)
        .unwrap()
        .into_iter()
        .map(|mut c| thread::spawn(move || f(&mut c)))
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn all_reduce_sums_in_rank_order_on_every_rank() {
    let n = 1000;
    for op in [ReduceOp::Sum, ReduceOp::Avg] {
        let outs = on_ranks(3, move |c| {
            let t = Tensor::from_vec(data(c.rank(), n), &[10, 100]).unwrap();
            c.all_reduce(&t, op).unwrap();
            t.to_vec::<f32>().unwrap()
        });
        let want: Vec<f32> = (0..n)
            .map(|i| {
                let s = (data(0, n)[i] + data(1, n)[i]) + data(2, n)[i];
                if op == ReduceOp::Avg {
                    s / 3.0
                } else {
                    s
                }
            })
            .collect();
        for (r, o) in outs.iter().enumerate() {
            assert_eq!(o, &want, "rank {r}, {op:?}");
        }
    }
}

#[test]
fn reduce_scatter_all_gather_and_broadcast() {
    let outs = on_ranks(4, |c| {
        let r = c.rank();
        let input = Tensor::from_vec(data(r, 8), &[8]).unwrap();
        let part = Tensor::zeros(&[2], steel_runtime::DType::F32);
        c.reduce_scatter(&input, &part, ReduceOp::Sum).unwrap();
        let gathered = Tensor::zeros(&[8], steel_runtime::DType::F32);
        c.all_gather(&part, &gathered).unwrap();
        let b = Tensor::from_vec(data(r, 5), &[5]).unwrap();
        c.broadcast(&b, 2).unwrap();
        (
            part.to_vec::<f32>().unwrap(),
            gathered.to_vec::<f32>().unwrap(),
            b.to_vec::<f32>().unwrap(),
        )
    });
    let sum: Vec<f32> =
        (0..8).map(|i| ((data(0, 8)[i] + data(1, 8)[i]) + data(2, 8)[i]) + data(3, 8)[i]).collect();
    for (r, (part, gathered, b)) in outs.iter().enumerate() {
        assert_eq!(part, &sum[2 * r..2 * r + 2], "rank {r} slice");
        assert_eq!(gathered, &sum, "rank {r} gather");
        assert_eq!(b, &data(2, 5), "rank {r} broadcast");
    }
}

#[test]
fn mismatched_sizes_fail_on_every_rank_without_hanging() {
    let outs = on_ranks(2, |c| {
        let n = if c.rank() == 0 { 4 } else { 5 };
        let t = Tensor::from_vec(vec![1f32; n], &[n]).unwrap();
        c.all_reduce(&t, ReduceOp::Sum).map_err(|e| e.to_string())
    });
    for o in outs {
        assert!(o.unwrap_err().contains("different sizes"));
    }
    assert!(InProcessComm::group(0).is_err());
}
