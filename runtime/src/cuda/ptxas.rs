//! ptxas's `-v` report, read from NVRTC's program log.
//!
//! With `-Xptxas -v`, NVRTC's log carries ptxas's own lines for every entry function:
//!
//! ```text
//! ptxas info    : Compiling entry function 'rms_norm_fwd_bf16' for 'sm_90'
//! ptxas info    : Function properties for rms_norm_fwd_bf16
//! ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
//! ptxas info    : Used 30 registers, used 1 barriers, 128 bytes smem
//! ptxas info    : Compile time = 3.434 ms
//! ```
//!
//! [`parse`] groups them per kernel, keeps the lines verbatim (reports print ptxas's wording)
//! and extracts the numbers CI gates on. Compiler diagnostics are found by [`warnings`].

/// One entry function's ptxas report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelReport {
    /// The entry function's symbol.
    pub name: String,
    /// The architecture ptxas compiled for (`sm_90`).
    pub arch: String,
    /// ptxas's lines about this kernel, verbatim, without the compile time (which differs run to
    /// run).
    pub lines: Vec<String>,
    pub registers: u32,
    pub barriers: u32,
    /// Static shared memory (`smem`), bytes.
    pub shared_bytes: u64,
    /// Constant bank 0 (`cmem[0]`), bytes, when reported.
    pub cmem0_bytes: u64,
    pub stack_frame_bytes: u64,
    pub spill_store_bytes: u64,
    pub spill_load_bytes: u64,
}

impl KernelReport {
    /// Whether ptxas spilled registers to local memory.
    pub fn spills(&self) -> bool {
        self.spill_store_bytes > 0 || self.spill_load_bytes > 0
    }
}

/// The number just before `unit` in `text` (`"256 bytes stack frame"` → 256 for `"bytes stack"`).
fn number_before(text: &str, unit: &str) -> Option<u64> {
    let at = text.find(unit)?;
    text[..at].split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty())?.parse().ok()
}

/// The message part of a ptxas line: after `ptxas info    :` / `ptxas         .`.
fn message(line: &str) -> Option<&str> {
    let rest = line.trim_start().strip_prefix("ptxas")?;
    let rest = rest.trim_start();
    let rest = rest.strip_prefix("info").unwrap_or(rest).trim_start();
    Some(rest.strip_prefix(':').or_else(|| rest.strip_prefix('.')).unwrap_or(rest).trim())
}

/// Every entry function's report, in the order ptxas compiled them.
pub fn parse(log: &str) -> Vec<KernelReport> {
    let mut out: Vec<KernelReport> = Vec::new();
    for line in log.lines() {
        let Some(msg) = message(line) else { continue };
        if let Some(rest) = msg.strip_prefix("Compiling entry function '") {
            let mut parts = rest.splitn(2, '\'');
            let name = parts.next().unwrap_or_default().to_string();
            let arch =
                parts.next().and_then(|r| r.split('\'').nth(1)).unwrap_or_default().to_string();
            out.push(KernelReport { name, arch, ..KernelReport::default() });
            continue;
        }
        let Some(k) = out.last_mut() else { continue };
        if msg.starts_with("Compile time") {
            continue;
        }
        if msg.contains("bytes stack frame") {
            k.stack_frame_bytes = number_before(msg, "bytes stack frame").unwrap_or(0);
            k.spill_store_bytes = number_before(msg, "bytes spill stores").unwrap_or(0);
            k.spill_load_bytes = number_before(msg, "bytes spill loads").unwrap_or(0);
        } else if msg.starts_with("Used ") {
            k.registers = number_before(msg, "registers").unwrap_or(0) as u32;
            k.barriers = number_before(msg, "barriers").unwrap_or(0) as u32;
            k.shared_bytes = number_before(msg, "bytes smem").unwrap_or(0);
            k.cmem0_bytes = number_before(msg, "bytes cmem[0]").unwrap_or(0);
        }
        k.lines.push(line.trim_end().to_string());
    }
    out
}

/// The log's warning lines (front end `warning #…`, ptxas `ptxas warning`), verbatim.
pub fn warnings(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains(": warning") || l.contains("ptxas warning") || l.starts_with("warning")
        })
        .map(str::to_string)
        .collect()
}
