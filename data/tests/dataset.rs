//! The dataset iterator: exact resume (also at another world size), append, mixtures, and
//! refusal of changed or duplicated data.

use crate::tokenize::tmpdir;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use steel_data::dataset::{DataSpec, Dataset, DatasetOptions};
use steel_data::shard::{ShardWriter, TokenDType};

const BLOCK: usize = 8;

/// Writes `files` shards of `blocks` blocks each into `dir`; block b of file f (global tag
/// `tag0 + f·blocks + b`) starts with its tag, so every block read identifies itself.
fn make_shards(dir: &Path, prefix: &str, files: usize, blocks: usize, tag0: u32) {
    for f in 0..files {
        let mut w = ShardWriter::new(
            dir,
            &format!("{prefix}{f}"),
            BLOCK * blocks,
            TokenDType::I32,
            151_643,
        )
        .unwrap();
        for b in 0..blocks {
            let tag = tag0 + (f * blocks + b) as u32;
            let block: Vec<u32> = (0..BLOCK as u32)
                .map(|i| if i == 0 { tag } else { 1_000_000 + tag * 10 + i })
                .collect();
            w.add(&block).unwrap();
        }
        w.finish().unwrap();
    }
}

fn opts(seed: u64) -> DatasetOptions {
    DatasetOptions { block_size: BLOCK, seed, shuffle: true }
}

fn tags(ds: &mut Dataset, n: usize) -> Vec<u32> {
    (0..n).map(|_| ds.next_block().unwrap()[0]).collect()
}

fn spec(dir: &Path) -> Vec<DataSpec> {
    vec![DataSpec { dir: dir.to_path_buf(), weight: 1.0 }]
}

fn setup(name: &str) -> PathBuf {
    let d = tmpdir(name);
    make_shards(&d.join("data/a"), "a", 2, 5, 0);
    make_shards(&d.join("data/b/deeper"), "b", 1, 4, 100);
    d
}

#[test]
fn every_epoch_is_a_permutation_of_all_blocks() {
    let d = setup("epochs");
    let mut ds = Dataset::open(&spec(&d.join("data")), opts(7), 0, 1).unwrap();
    assert_eq!(ds.blocks_per_epoch(), vec![14]);
    let all: HashSet<u32> = (0..10).chain(100..104).collect();
    let e1 = tags(&mut ds, 14);
    let e2 = tags(&mut ds, 14);
    assert_eq!(e1.iter().copied().collect::<HashSet<_>>(), all);
    assert_eq!(e2.iter().copied().collect::<HashSet<_>>(), all);
    assert_ne!(e1, e2, "each epoch draws a fresh permutation");
    assert_eq!(ds.progress(), vec![(2, 0)]);
    // The block content is read correctly: block tagged t is t then its own tokens.
    let mut again = Dataset::open(&spec(&d.join("data")), opts(7), 0, 1).unwrap();
    let b = again.next_block().unwrap();
    assert_eq!(b[0], e1[0]);
    assert_eq!(b[3], 1_000_000 + e1[0] * 10 + 3);
}

#[test]
fn resume_yields_exactly_the_blocks_of_an_uninterrupted_run() {
    let d = setup("resume");
    let data = d.join("data");
    let mut full = Dataset::open(&spec(&data), opts(3), 0, 1).unwrap();
    let reference = tags(&mut full, 40);

    let mut first = Dataset::open(&spec(&data), opts(3), 0, 1).unwrap();
    let head = tags(&mut first, 17);
    first.save(&d.join("state.safetensors")).unwrap();
    drop(first);
    let mut resumed = Dataset::restore(&d.join("state.safetensors"), 0, 1).unwrap();
    let tail = tags(&mut resumed, 23);
    assert_eq!([head, tail].concat(), reference);
}

#[test]
fn resume_at_another_world_size_continues_the_global_order() {
    let d = setup("world");
    let data = d.join("data");
    let mut full = Dataset::open(&spec(&data), opts(11), 0, 1).unwrap();
    let g = tags(&mut full, 60);

    // 5 rounds at world 2: rank r takes global positions r, r+2, …
    let mut ranks: Vec<Dataset> =
        (0..2).map(|r| Dataset::open(&spec(&data), opts(11), r, 2).unwrap()).collect();
    for round in 0..5 {
        for (r, ds) in ranks.iter_mut().enumerate() {
            assert_eq!(
                ds.next_block().unwrap()[0],
                g[2 * round + r],
                "world 2, round {round}, rank {r}"
            );
        }
    }
    ranks[0].save(&d.join("state.safetensors")).unwrap();
    // …then 9 rounds at world 3 continue at global position 10 (crossing an epoch boundary).
    let mut ranks: Vec<Dataset> =
        (0..3).map(|r| Dataset::restore(&d.join("state.safetensors"), r, 3).unwrap()).collect();
    for round in 0..9 {
        for (r, ds) in ranks.iter_mut().enumerate() {
            assert_eq!(
                ds.next_block().unwrap()[0],
                g[10 + 3 * round + r],
                "world 3, round {round}, rank {r}"
            );
        }
    }
}

#[test]
fn append_keeps_the_consumed_prefix_and_yields_every_new_block_once() {
    let d = setup("append");
    let data = d.join("data");
    let mut ref_run = Dataset::open(&spec(&data), opts(5), 0, 1).unwrap();
    let reference = tags(&mut ref_run, 6);

    let mut ds = Dataset::open(&spec(&data), opts(5), 0, 1).unwrap();
    let consumed = tags(&mut ds, 6);
    assert_eq!(consumed, reference, "the prefix before the append is the uninterrupted one");
    ds.save(&d.join("state.safetensors")).unwrap();
    let mut ds = Dataset::restore(&d.join("state.safetensors"), 0, 1).unwrap();
    make_shards(&d.join("new"), "n", 3, 2, 200);
    let report = ds.append(0, &d.join("new")).unwrap();
    assert_eq!((report.files.len(), report.blocks), (3, 6));
    // The rest of the epoch: the 8 unconsumed old blocks and the 6 new ones, each exactly once.
    let rest = tags(&mut ds, 14);
    let want: HashSet<u32> =
        (0..10).chain(100..104).filter(|t| !consumed.contains(t)).chain(200..206).collect();
    assert_eq!(rest.len(), want.len());
    assert_eq!(rest.iter().copied().collect::<HashSet<_>>(), want);
    // The next epoch covers old and new blocks together.
    let next: HashSet<u32> = tags(&mut ds, 20).into_iter().collect();
    assert_eq!(next, (0..10).chain(100..104).chain(200..206).collect());
    // Appending the same directory again adds nothing; a copy of a registered shard is refused.
    assert_eq!(ds.append(0, &d.join("new")).unwrap().files.len(), 0);
    let copy_dir = d.join("copy");
    std::fs::create_dir_all(&copy_dir).unwrap();
    std::fs::copy(d.join("new/n0_0000000000.bin"), copy_dir.join("dup.bin")).unwrap();
    let err = ds.append(0, &copy_dir).expect_err("duplicate").to_string();
    assert!(err.contains("dup.bin") && err.contains("n0_0000000000.bin"), "{err}");
}

#[test]
fn restore_refuses_changed_or_missing_shards_by_name() {
    let d = setup("refuse");
    let data = d.join("data");
    let mut ds = Dataset::open(&spec(&data), opts(1), 0, 1).unwrap();
    tags(&mut ds, 3);
    ds.save(&d.join("state.safetensors")).unwrap();
    let victim = data.join("a/a1_0000000000.bin");
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&victim, &bytes).unwrap();
    let err =
        Dataset::restore(&d.join("state.safetensors"), 0, 1).err().expect("changed").to_string();
    assert!(err.contains("a1_0000000000.bin") && err.contains("changed"), "{err}");
    std::fs::remove_file(&victim).unwrap();
    let err =
        Dataset::restore(&d.join("state.safetensors"), 0, 1).err().expect("missing").to_string();
    assert!(err.contains("a1_0000000000.bin") && err.contains("missing"), "{err}");
}

#[test]
fn duplicate_content_is_refused_at_open() {
    let d = setup("dup");
    std::fs::copy(d.join("data/a/a0_0000000000.bin"), d.join("data/b/same.bin")).unwrap();
    let err =
        Dataset::open(&spec(&d.join("data")), opts(1), 0, 1).err().expect("duplicate").to_string();
    assert!(err.contains("same.bin") && err.contains("a0_0000000000.bin"), "{err}");
}

#[test]
fn weighted_mixture_resumes_exactly_at_any_world_size() {
    let d = tmpdir("mixture");
    make_shards(&d.join("x"), "x", 2, 6, 0);
    make_shards(&d.join("y"), "y", 1, 6, 500);
    let specs = vec![
        DataSpec { dir: d.join("x"), weight: 3.0 },
        DataSpec { dir: d.join("y"), weight: 1.0 },
    ];
    let mut full = Dataset::open(&specs, opts(9), 0, 1).unwrap();
    let g = tags(&mut full, 60);
    let from_y = g.iter().filter(|&&t| t >= 500).count();
    assert!(
        from_y > 5 && from_y < 30,
        "weights 3:1 should give roughly a quarter from y, got {from_y}/60"
    );

    let mut ds = Dataset::open(&specs, opts(9), 0, 1).unwrap();
    let head = tags(&mut ds, 21);
    ds.save(&d.join("state.safetensors")).unwrap();
    let mut ranks: Vec<Dataset> =
        (0..3).map(|r| Dataset::restore(&d.join("state.safetensors"), r, 3).unwrap()).collect();
    let mut tail = Vec::new();
    for _ in 0..13 {
        for ds in ranks.iter_mut() {
            tail.push(ds.next_block().unwrap()[0]);
        }
    }
    assert_eq!(head, g[..21]);
    // At world 3 each round draws the 3 choices in rank order, as 3 rounds at world 1 do.
    assert_eq!(tail, g[21..60]);
}
