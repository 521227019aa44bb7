//! The training data iterator over packed shards (DESIGN §5; spec §4, minus its defects).
//!
//! - **Discovery**: every `*.bin` under each data directory, recursively (hidden entries are
//!   skipped: the shard writer's temporary files are hidden), sorted by path. Each file is
//!   validated (header, size) and hashed whole with BLAKE3. Two files with the same content are
//!   refused, naming both.
//! - **Blocks**: each file is cut into consecutive, disjoint blocks of `block_size` tokens; the
//!   blocks of all files of a source get global ids in file order.
//! - **Order**: per epoch one seeded permutation of all block ids of the source (PCG64 with
//!   numpy's Fisher–Yates and bounded-integer rules; the seeding differs from numpy's
//!   SeedSequence). Epochs continue without end, each drawing a fresh permutation from the
//!   continuing generator.
//! - **Ranks**: the sequence of blocks is global. Rank r of N takes global positions
//!   r, r + N, r + 2N, … (one position per rank per round), so the global batch does not depend
//!   on N and a run can resume at another world size.
//! - **Mixtures**: with several weighted sources, each round draws N source choices (in rank
//!   order) from a mixture generator; a source's own positions advance by the number of ranks
//!   that chose it. The mixture generator is part of the state (the reference's was not).
//! - **State**: everything above (file list with paths, hashes and block counts, epoch,
//!   generators, the current permutation and the global position) is saved as one safetensors
//!   file: the permutations as tensors, the rest as JSON in its metadata. Restoring re-hashes
//!   every file and refuses a missing or changed one by name.
//! - **Append**: new shards join a source mid-run; the not-yet-consumed blocks of the current
//!   epoch and all new blocks are shuffled together, the consumed prefix is kept, and a shard
//!   whose content is already registered is refused by name. Any number of files, any world size.

use crate::shard::{Shard, ShardHeader, HEADER_BYTES};
use crate::{DataError, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

// ---- the generator -------------------------------------------------------------------------

/// PCG64 (128-bit LCG, XSL-RR output) with numpy's buffered 32-bit draws.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pcg64 {
    state: u128,
    inc: u128,
    has_u32: bool,
    u32_buf: u32,
}

const PCG_MULT: u128 = 0x2360_ED05_1FC6_5DA4_4385_DF64_9FCC_F645;

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Pcg64 {
    /// A generator seeded from `seed` (splitmix64 expansion; not numpy's SeedSequence).
    pub fn seed(seed: u64) -> Pcg64 {
        let mut s = seed;
        let state = ((splitmix(&mut s) as u128) << 64) | splitmix(&mut s) as u128;
        let inc = ((((splitmix(&mut s) as u128) << 64) | splitmix(&mut s) as u128) << 1) | 1;
        let mut g = Pcg64 { state: 0, inc, has_u32: false, u32_buf: 0 };
        g.step();
        g.state = g.state.wrapping_add(state);
        g.step();
        g
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
    }

    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let s = self.state;
        (((s >> 64) as u64) ^ (s as u64)).rotate_right((s >> 122) as u32)
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.has_u32 {
            self.has_u32 = false;
            return self.u32_buf;
        }
        let v = self.next_u64();
        self.has_u32 = true;
        self.u32_buf = (v >> 32) as u32;
        v as u32
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in `0..=max`, by masked rejection (numpy's `bounded` rule).
    pub fn bounded(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        for s in [1, 2, 4, 8, 16, 32] {
            mask |= mask >> s;
        }
        if max <= u32::MAX as u64 {
            loop {
                let v = (self.next_u32() as u64) & mask;
                if v <= max {
                    return v;
                }
            }
        }
        loop {
            let v = self.next_u64() & mask;
            if v <= max {
                return v;
            }
        }
    }

    /// Fisher–Yates from the end, in place.
    pub fn shuffle(&mut self, a: &mut [u64]) {
        for i in (1..a.len()).rev() {
            let j = self.bounded(i as u64) as usize;
            a.swap(i, j);
        }
    }

    /// A permutation of `0..n`.
    pub fn permutation(&mut self, n: u64) -> Vec<u64> {
        let mut a: Vec<u64> = (0..n).collect();
        self.shuffle(&mut a);
        a
    }

    pub fn to_state(&self) -> RngState {
        RngState {
            state: format!("{:032x}", self.state),
            inc: format!("{:032x}", self.inc),
            has_uint32: self.has_u32,
            uinteger: self.u32_buf,
        }
    }

    pub fn from_state(s: &RngState) -> Result<Pcg64> {
        let parse = |x: &str| {
            u128::from_str_radix(x, 16)
                .map_err(|_| DataError::Invalid(format!("bad generator state {x:?}")))
        };
        Ok(Pcg64 {
            state: parse(&s.state)?,
            inc: parse(&s.inc)?,
            has_u32: s.has_uint32,
            u32_buf: s.uinteger,
        })
    }
}

/// A generator's state as saved (hex strings: JSON numbers cannot hold 128 bits).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RngState {
    state: String,
    inc: String,
    has_uint32: bool,
    uinteger: u32,
}

// ---- files ------------------------------------------------------------------------------------

/// One registered shard.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileEntry {
    pub path: PathBuf,
    /// BLAKE3 of the whole file, hex.
    pub hash: String,
    pub blocks: u64,
    /// The smallest and largest token id, read in the same pass as the hash (not saved in a
    /// data state: a restore reads them again while it checks the hashes).
    #[serde(skip)]
    pub ids: Option<(i64, i64)>,
}

/// Reads `buf.len()` bytes from `f` unless the file ends first; the count read.
fn fill(f: &mut std::fs::File, buf: &mut [u8], path: &Path) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(DataError::io(path, e)),
        }
    }
    Ok(n)
}

/// BLAKE3 of a whole shard and, in the same pass, the range of its token ids (`dtype` read from
/// its header; the body is read in chunks that hold whole tokens).
pub fn hash_and_scan(path: &Path) -> Result<(String, Option<(i64, i64)>)> {
    let mut f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut h = blake3::Hasher::new();
    let mut head = [0u8; HEADER_BYTES];
    let n = fill(&mut f, &mut head, path)?;
    h.update(&head[..n]);
    let dtype = ShardHeader::parse(path, &head[..n], None)?.dtype;
    let mut buf = vec![0u8; 1 << 20];
    let mut range: Option<(i64, i64)> = None;
    loop {
        let n = fill(&mut f, &mut buf, path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        if let Some((lo, hi)) = dtype.id_range(&buf[..n]) {
            range = Some(range.map_or((lo, hi), |(a, b)| (a.min(lo), b.max(hi))));
        }
        if n < buf.len() {
            break;
        }
    }
    Ok((h.finalize().to_hex().to_string(), range))
}

/// Every `*.bin` under `dir`, recursively, hidden entries skipped, sorted.
pub fn find_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for e in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
            let p = e.map_err(|e| DataError::io(dir, e))?.path();
            if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')) {
                continue;
            }
            if p.is_dir() {
                walk(&p, out)?;
            } else if p.extension().is_some_and(|x| x == "bin") {
                out.push(p);
            }
        }
        Ok(())
    }
    if !dir.is_dir() {
        return Err(DataError::format(dir, "not a directory"));
    }
    let mut out = Vec::new();
    walk(dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Validates and hashes `paths` in parallel.
fn register(paths: &[PathBuf], block_size: usize) -> Result<Vec<FileEntry>> {
    paths
        .par_iter()
        .map(|p| {
            let mut head = [0u8; HEADER_BYTES];
            let mut f = std::fs::File::open(p).map_err(|e| DataError::io(p, e))?;
            let len = f.metadata().map_err(|e| DataError::io(p, e))?.len();
            f.read_exact(&mut head).map_err(|e| DataError::format(p, format!("cannot read the shard header: {e}")))?;
            let h = ShardHeader::parse(p, &head, Some(len))?;
            if h.chunk_size % block_size as u64 != 0 {
                return Err(DataError::format(
                    p,
                    format!("{} tokens is not a whole number of {block_size}-token blocks (tokenize with a matching --block-size)", h.chunk_size),
                ));
            }
            let (hash, ids) = hash_and_scan(p)?;
            Ok(FileEntry { path: p.clone(), hash, blocks: h.chunk_size / block_size as u64, ids })
        })
        .collect()
}

// ---- one source ---------------------------------------------------------------------------

/// A data directory, its shards and its position in the global block order.
struct Source {
    dir: PathBuf,
    weight: f64,
    files: Vec<FileEntry>,
    shards: Vec<Shard>,
    /// Global id of each file's first block.
    starts: Vec<u64>,
    total: u64,
    shuffle: bool,
    /// The generator after drawing `order`.
    rng: Pcg64,
    epoch: u64,
    order: Vec<u64>,
    /// Global positions of this epoch already consumed.
    pos: u64,
    /// Orders of the next epochs, drawn ahead when a rank reads past the epoch's end, with the
    /// generator after each draw. Not saved: they are re-drawn identically from `rng`.
    ahead: Vec<(Vec<u64>, Pcg64)>,
}

impl Source {
    fn new(
        dir: &Path,
        weight: f64,
        files: Vec<FileEntry>,
        shuffle: bool,
        seed: u64,
    ) -> Result<Source> {
        let mut s = Source {
            dir: dir.to_path_buf(),
            weight,
            files: Vec::new(),
            shards: Vec::new(),
            starts: Vec::new(),
            total: 0,
            shuffle,
            rng: Pcg64::seed(seed),
            epoch: 0,
            order: Vec::new(),
            pos: 0,
            ahead: Vec::new(),
        };
        s.attach(files)?;
        if s.total == 0 {
            return Err(DataError::format(
                dir,
                "holds no shards (no *.bin files with at least one block)",
            ));
        }
        s.order = s.draw_order(None).0;
        Ok(s)
    }

    fn attach(&mut self, files: Vec<FileEntry>) -> Result<()> {
        for f in files {
            self.shards.push(Shard::open(&f.path)?);
            self.starts.push(self.total);
            self.total += f.blocks;
            self.files.push(f);
        }
        Ok(())
    }

    /// A full-epoch order drawn from `rng` (or from the source's generator).
    fn draw_order(&mut self, from: Option<Pcg64>) -> (Vec<u64>, Pcg64) {
        let own = from.is_none();
        let mut rng = from.unwrap_or_else(|| self.rng.clone());
        let order =
            if self.shuffle { rng.permutation(self.total) } else { (0..self.total).collect() };
        if own {
            self.rng = rng.clone();
        }
        (order, rng)
    }

    /// The block id at global position `pos + k` (possibly in a later epoch).
    fn id_at(&mut self, k: u64) -> u64 {
        let mut idx = self.pos + k;
        if idx < self.order.len() as u64 {
            return self.order[idx as usize];
        }
        idx -= self.order.len() as u64;
        let mut e = 0;
        loop {
            if e == self.ahead.len() {
                let from =
                    self.ahead.last().map(|(_, g)| g.clone()).unwrap_or_else(|| self.rng.clone());
                let drawn = self.draw_order(Some(from));
                self.ahead.push(drawn);
            }
            let len = self.ahead[e].0.len() as u64;
            if idx < len {
                return self.ahead[e].0[idx as usize];
            }
            idx -= len;
            e += 1;
        }
    }

    fn advance(&mut self, n: u64) {
        self.pos += n;
        while self.pos >= self.order.len() as u64 {
            self.pos -= self.order.len() as u64;
            let (order, rng) =
                if self.ahead.is_empty() { self.draw_order(None) } else { self.ahead.remove(0) };
            self.order = order;
            self.rng = rng;
            self.epoch += 1;
        }
    }

    fn read_block(&self, id: u64, block_size: usize) -> Result<Vec<u32>> {
        let f = self.starts.partition_point(|&s| s <= id) - 1;
        let within = (id - self.starts[f]) as usize;
        let start = within.checked_mul(block_size).ok_or_else(|| {
            DataError::format(
                &self.files[f].path,
                format!("block {within} is past the shard's end"),
            )
        })?;
        let toks = self.shards[f].tokens(start, block_size)?;
        toks.into_iter()
            .map(|t| {
                u32::try_from(t).map_err(|_| {
                    DataError::format(&self.files[f].path, format!("negative or huge token id {t}"))
                })
            })
            .collect()
    }
}

// ---- the dataset --------------------------------------------------------------------------

/// One data directory and its mixture weight.
#[derive(Clone, Debug)]
pub struct DataSpec {
    pub dir: PathBuf,
    pub weight: f64,
}

/// Options of a dataset.
#[derive(Clone, Copy, Debug)]
pub struct DatasetOptions {
    /// Tokens per block (sequence length + 1).
    pub block_size: usize,
    pub seed: u64,
    pub shuffle: bool,
}

/// What `Dataset::append` registered.
#[derive(Clone, Debug, Default)]
pub struct AppendReport {
    pub files: Vec<PathBuf>,
    pub blocks: u64,
}

/// The iterator for one rank of `world` (see the module docs).
pub struct Dataset {
    sources: Vec<Source>,
    mix_rng: Pcg64,
    opts: DatasetOptions,
    rank: usize,
    world: usize,
    /// Rounds consumed so far (global positions / world), for reporting.
    pub rounds: u64,
}

/// The saved state (JSON in the safetensors metadata).
#[derive(Serialize, Deserialize)]
struct SavedState {
    format: String,
    block_size: usize,
    seed: u64,
    shuffle: bool,
    mixture_rng: RngState,
    rounds: u64,
    sources: Vec<SavedSource>,
}

#[derive(Serialize, Deserialize)]
struct SavedSource {
    dir: PathBuf,
    weight: f64,
    files: Vec<FileEntry>,
    epoch: u64,
    pos: u64,
    rng: RngState,
}

const STATE_FORMAT: &str = "steel-dataset-v1";
const STATE_KEY: &str = "steel.dataset";

fn check_rank(rank: usize, world: usize) -> Result<()> {
    if world == 0 || rank >= world {
        return Err(DataError::Invalid(format!("rank {rank} is not in a world of {world}")));
    }
    Ok(())
}

/// Refuses content registered twice, naming both files.
fn refuse_duplicates<'a>(
    known: impl IntoIterator<Item = &'a FileEntry>,
    new: &[FileEntry],
) -> Result<()> {
    let mut seen: HashMap<&str, &Path> =
        known.into_iter().map(|f| (f.hash.as_str(), f.path.as_path())).collect();
    for f in new {
        if let Some(other) = seen.get(f.hash.as_str()) {
            return Err(DataError::format(
                &f.path,
                format!("has the same content as the already registered shard {}", other.display()),
            ));
        }
        seen.insert(&f.hash, &f.path);
    }
    Ok(())
}

impl Dataset {
    /// A fresh dataset over `specs` for rank `rank` of `world`.
    pub fn open(
        specs: &[DataSpec],
        opts: DatasetOptions,
        rank: usize,
        world: usize,
    ) -> Result<Dataset> {
        check_rank(rank, world)?;
        if specs.is_empty() {
            return Err(DataError::Invalid("no data directories given".into()));
        }
        if opts.block_size == 0 {
            return Err(DataError::Invalid("the block size must be at least 1".into()));
        }
        let mut sources = Vec::new();
        let mut all: Vec<FileEntry> = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            if !(spec.weight > 0.0 && spec.weight.is_finite()) {
                return Err(DataError::format(
                    &spec.dir,
                    format!("mixture weight must be positive, got {}", spec.weight),
                ));
            }
            let files = register(&find_shards(&spec.dir)?, opts.block_size)?;
            refuse_duplicates(&all, &files)?;
            all.extend(files.iter().cloned());
            sources.push(Source::new(
                &spec.dir,
                spec.weight,
                files,
                opts.shuffle,
                opts.seed.wrapping_add(i as u64),
            )?);
        }
        Ok(Dataset {
            sources,
            mix_rng: Pcg64::seed(opts.seed ^ 0x6d69_7874_7572_6521),
            opts,
            rank,
            world,
            rounds: 0,
        })
    }

    /// The largest token id of every registered shard and the file holding it, and likewise
    /// the smallest (`None` without tokens): what a model's vocabulary must cover.
    pub fn id_extremes(&self) -> Option<((i64, PathBuf), (i64, PathBuf))> {
        let files = self.sources.iter().flat_map(|s| s.files.iter());
        let mut out: Option<((i64, PathBuf), (i64, PathBuf))> = None;
        for f in files {
            let Some((lo, hi)) = f.ids else { continue };
            out = Some(match out {
                None => ((lo, f.path.clone()), (hi, f.path.clone())),
                Some((min, max)) => (
                    if lo < min.0 { (lo, f.path.clone()) } else { min },
                    if hi > max.0 { (hi, f.path.clone()) } else { max },
                ),
            });
        }
        out
    }

    pub fn block_size(&self) -> usize {
        self.opts.block_size
    }

    /// Total blocks per epoch of each source.
    pub fn blocks_per_epoch(&self) -> Vec<u64> {
        self.sources.iter().map(|s| s.total).collect()
    }

    /// (epoch, position within the epoch) of each source.
    pub fn progress(&self) -> Vec<(u64, u64)> {
        self.sources.iter().map(|s| (s.epoch, s.pos)).collect()
    }

    /// The directory of each source (its shards are found under it).
    pub fn source_dirs(&self) -> Vec<&Path> {
        self.sources.iter().map(|s| s.dir.as_path()).collect()
    }

    /// The registered files of each source.
    pub fn files(&self) -> Vec<&[FileEntry]> {
        self.sources.iter().map(|s| s.files.as_slice()).collect()
    }

    /// The source each rank reads this round.
    fn choices(&mut self) -> Vec<usize> {
        if self.sources.len() == 1 {
            return vec![0; self.world];
        }
        let total: f64 = self.sources.iter().map(|s| s.weight).sum();
        (0..self.world)
            .map(|_| {
                let u = self.mix_rng.next_f64() * total;
                let mut acc = 0.0;
                for (i, s) in self.sources.iter().enumerate() {
                    acc += s.weight;
                    if u < acc {
                        return i;
                    }
                }
                self.sources.len() - 1
            })
            .collect()
    }

    /// This rank's next block (`block_size` tokens); every rank advances the global position
    /// by one round.
    pub fn next_block(&mut self) -> Result<Vec<u32>> {
        let choices = self.choices();
        let mine = choices[self.rank];
        let offset = choices[..self.rank].iter().filter(|&&c| c == mine).count() as u64;
        let id = self.sources[mine].id_at(offset);
        let block = self.sources[mine].read_block(id, self.opts.block_size)?;
        for (i, s) in self.sources.iter_mut().enumerate() {
            let n = choices.iter().filter(|&&c| c == i).count() as u64;
            if n > 0 {
                s.advance(n);
            }
        }
        self.rounds += 1;
        Ok(block)
    }

    /// `b` blocks for this rank, row-major `[b, block_size]`.
    pub fn next_batch(&mut self, b: usize) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(b * self.opts.block_size);
        for _ in 0..b {
            out.extend(self.next_block()?);
        }
        Ok(out)
    }

    /// Saves the complete state to `path` (written to a temporary file, then renamed).
    pub fn save(&self, path: &Path) -> Result<()> {
        let state = SavedState {
            format: STATE_FORMAT.into(),
            block_size: self.opts.block_size,
            seed: self.opts.seed,
            shuffle: self.opts.shuffle,
            mixture_rng: self.mix_rng.to_state(),
            rounds: self.rounds,
            sources: self
                .sources
                .iter()
                .map(|s| SavedSource {
                    dir: s.dir.clone(),
                    weight: s.weight,
                    files: s.files.clone(),
                    epoch: s.epoch,
                    pos: s.pos,
                    rng: s.rng.to_state(),
                })
                .collect(),
        };
        let json = serde_json::to_string(&state).map_err(|e| DataError::Invalid(e.to_string()))?;
        let orders: Vec<(String, Vec<u8>, usize)> = self
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                (
                    format!("source.{i}.order"),
                    s.order.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    s.order.len(),
                )
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = orders
            .iter()
            .map(|(n, b, len)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::U64, vec![*len], b)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| DataError::Invalid(e.to_string()))
            })
            .collect::<Result<_>>()?;
        let meta: HashMap<String, String> = [(STATE_KEY.to_string(), json)].into_iter().collect();
        let tmp = path.with_extension("tmp");
        safetensors::tensor::serialize_to_file(views, Some(meta), &tmp)
            .map_err(|e| DataError::format(&tmp, e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))
    }

    /// Restores a saved state for rank `rank` of `world` (which may differ from the world that
    /// saved it). Every file is re-hashed; a missing or changed one is refused by name.
    pub fn restore(path: &Path, rank: usize, world: usize) -> Result<Dataset> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        Self::restore_bytes(&bytes, path, rank, world)
    }

    /// [`restore`](Dataset::restore) from a state file's bytes already read (a checkpoint reads
    /// them through its manifest); `path` names the file in messages.
    pub fn restore_bytes(bytes: &[u8], path: &Path, rank: usize, world: usize) -> Result<Dataset> {
        check_rank(rank, world)?;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| DataError::format(path, format!("not a dataset state: {e}")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| DataError::format(path, e.to_string()))?;
        let json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(STATE_KEY))
            .ok_or_else(|| DataError::format(path, "no dataset state in this file"))?;
        let state: SavedState = serde_json::from_str(json)
            .map_err(|e| DataError::format(path, format!("bad dataset state: {e}")))?;
        if state.format != STATE_FORMAT {
            return Err(DataError::format(
                path,
                format!("unknown dataset state format {:?}", state.format),
            ));
        }
        let mut sources = Vec::new();
        for (i, s) in state.sources.iter().enumerate() {
            // The data-consistency check: same paths, same content.
            let files: Vec<FileEntry> = s
                .files
                .par_iter()
                .map(|f| -> Result<FileEntry> {
                    if !f.path.is_file() {
                        return Err(DataError::format(
                            &f.path,
                            "registered shard is missing (data must stay at the same path to \
                             resume)",
                        ));
                    }
                    let (h, ids) = hash_and_scan(&f.path)?;
                    if h != f.hash {
                        return Err(DataError::format(
                            &f.path,
                            "registered shard changed since the checkpoint (content hash differs)",
                        ));
                    }
                    Ok(FileEntry { ids, ..f.clone() })
                })
                .collect::<Result<_>>()?;
            let view = st
                .tensor(&format!("source.{i}.order"))
                .map_err(|e| DataError::format(path, e.to_string()))?;
            let order: Vec<u64> = view
                .data()
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .collect();
            let mut src = Source {
                dir: s.dir.clone(),
                weight: s.weight,
                files: Vec::new(),
                shards: Vec::new(),
                starts: Vec::new(),
                total: 0,
                shuffle: state.shuffle,
                rng: Pcg64::from_state(&s.rng)?,
                epoch: s.epoch,
                order,
                pos: s.pos,
                ahead: Vec::new(),
            };
            src.attach(files)?;
            // The saved block counts must be the shards' (a state edited or saved for another
            // block size would index past a shard's end).
            for (f, shard) in src.files.iter().zip(&src.shards) {
                let tokens = f.blocks.checked_mul(state.block_size as u64);
                if state.block_size == 0 || tokens != Some(shard.len() as u64) {
                    return Err(DataError::format(
                        path,
                        format!(
                            "source {i}: {} blocks of {} tokens recorded for {}, which holds {} \
                             tokens: the state does not match its shards",
                            f.blocks,
                            state.block_size,
                            f.path.display(),
                            shard.len()
                        ),
                    ));
                }
            }
            if src.order.len() as u64 != src.total || src.pos > src.total {
                return Err(DataError::format(
                    path,
                    format!("source {i}: the saved order does not match its files"),
                ));
            }
            sources.push(src);
        }
        Ok(Dataset {
            sources,
            mix_rng: Pcg64::from_state(&state.mixture_rng)?,
            opts: DatasetOptions {
                block_size: state.block_size,
                seed: state.seed,
                shuffle: state.shuffle,
            },
            rank,
            world,
            rounds: state.rounds,
        })
    }

    /// Appends the new shards found under `dir` to source `source` (see the module docs).
    /// Files already registered at the same path with the same content are skipped; a file
    /// whose content duplicates a registered one is refused by name.
    pub fn append(&mut self, source: usize, dir: &Path) -> Result<AppendReport> {
        let n = self.sources.len();
        let src = self.sources.get(source).ok_or_else(|| {
            DataError::Invalid(format!("source {source} does not exist ({n} sources)"))
        })?;
        let known: HashMap<&Path, &str> = self
            .sources
            .iter()
            .flat_map(|s| s.files.iter())
            .map(|f| (f.path.as_path(), f.hash.as_str()))
            .collect();
        let candidates = find_shards(dir)?;
        let entries = register(&candidates, self.opts.block_size)?;
        let mut new = Vec::new();
        for e in entries {
            match known.get(e.path.as_path()) {
                Some(h) if *h == e.hash => continue,
                Some(_) => {
                    return Err(DataError::format(
                        &e.path,
                        "registered shard changed since it was added (content hash differs)",
                    ))
                }
                None => new.push(e),
            }
        }
        refuse_duplicates(self.sources.iter().flat_map(|s| s.files.iter()), &new)?;
        let _ = src;
        let s = &mut self.sources[source];
        let first = s.total;
        let report = AppendReport {
            files: new.iter().map(|f| f.path.clone()).collect(),
            blocks: new.iter().map(|f| f.blocks).sum(),
        };
        s.attach(new)?;
        // Keep the consumed prefix; shuffle the rest of this epoch together with the new blocks.
        let pos = s.pos as usize;
        let mut rest: Vec<u64> = s.order[pos..].to_vec();
        rest.extend(first..s.total);
        if s.shuffle {
            s.rng.shuffle(&mut rest);
        }
        s.order.truncate(pos);
        s.order.extend(rest);
        s.ahead.clear();
        Ok(report)
    }
}
