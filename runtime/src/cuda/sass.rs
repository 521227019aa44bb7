//! The SASS of a cubin, read without a GPU. NVIDIA's `cuobjdump -sass` (pip
//! `nvidia-cuda-cuobjdump` with `nvidia-cuda-nvdisasm`, 13.2 or newer, read sm_90 cubins on any
//! machine) disassembles it; [`parse`] counts, per kernel, the instructions that show whether a
//! kernel does what it was written for: tensor-core MMAs (`HMMA`), shared-memory matrix loads
//! (`LDSM`), 128-bit global loads and stores (`LDG.E.128`, `STG.E.128`, and the generic
//! `LD.E.128`/`ST.E.128` of pointers read from memory), cp.async copies
//! (`LDGSTS`), local-memory traffic
//! (`LDL`/`STL`: spills or stack arrays) and barriers (`BAR`). A tensor-core kernel is thus
//! proven to use the tensor cores before any GPU runs it.

use super::{CudaError, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One kernel's instruction counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SassCounts {
    pub name: String,
    pub instructions: u32,
    pub hmma: u32,
    pub ldsm: u32,
    pub ldg128: u32,
    pub stg128: u32,
    /// `LDGSTS`: cp.async copies from global to shared memory.
    pub ldgsts: u32,
    /// `LDL` + `STL`.
    pub local: u32,
    pub bar: u32,
}

/// `cuobjdump`: `$STEEL_CUOBJDUMP`, then `bin/` beside each loaded NVRTC library and each
/// `LD_LIBRARY_PATH` entry (`…/lib` → `…/bin`: the pip wheels' `nvidia/cu13` layout), then
/// `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `/usr/local/cuda/bin`, then `PATH`.
pub fn find_cuobjdump() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("STEEL_CUOBJDUMP").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    let ld_path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let lib_dirs = super::headers::loaded_libraries("libnvrtc")
        .into_iter()
        .filter_map(|l| l.parent().map(Path::to_path_buf))
        .chain(ld_path.split(':').filter(|p| !p.is_empty()).map(PathBuf::from));
    dirs.extend(lib_dirs.filter_map(|d| d.parent().map(|p| p.join("bin"))));
    for v in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(v).filter(|s| !s.is_empty()) {
            dirs.push(PathBuf::from(root).join("bin"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/bin"));
    dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    dirs.into_iter().map(|d| d.join("cuobjdump")).find(|p| p.is_file())
}

/// The SASS listing of `cubin` (`cuobjdump -sass`).
pub fn disassemble(tool: &Path, cubin: &[u8]) -> Result<String> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = std::env::temp_dir().join(format!("steel-sass-{}-{n}.cubin", std::process::id()));
    std::fs::write(&file, cubin).map_err(|e| {
        CudaError::invalid("cuobjdump", format!("cannot write {}: {e}", file.display()))
    })?;
    // nvdisasm, which cuobjdump runs for sm_90, sits beside it in the pip layout.
    let mut path = tool.parent().map(|d| vec![d.to_path_buf()]).unwrap_or_default();
    path.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    let out = Command::new(tool)
        .arg("-sass")
        .arg(&file)
        .env("PATH", std::env::join_paths(path).unwrap_or_default())
        .output();
    let _ = std::fs::remove_file(&file);
    let out = out.map_err(|e| {
        CudaError::invalid("cuobjdump", format!("cannot run {}: {e}", tool.display()))
    })?;
    if !out.status.success() {
        return Err(CudaError::invalid(
            "cuobjdump",
            format!(
                "{} -sass failed: {}",
                tool.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The instruction counts of every `Function : <name>` of a `cuobjdump -sass` listing.
pub fn parse(sass: &str) -> Vec<SassCounts> {
    let mut out: Vec<SassCounts> = Vec::new();
    for line in sass.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("Function :") {
            out.push(SassCounts { name: name.trim().to_string(), ..SassCounts::default() });
            continue;
        }
        // Instructions: `/*0090*/   @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;`; encodings are
        // `/* 0x… */` lines.
        let (Some(k), Some(rest)) = (out.last_mut(), t.strip_prefix("/*")) else { continue };
        let Some((addr, body)) = rest.split_once("*/") else { continue };
        if !addr.chars().all(|c| c.is_ascii_hexdigit()) || addr.is_empty() {
            continue;
        }
        let mut words = body.split_whitespace();
        let mut op = words.next().unwrap_or("");
        if op.starts_with('@') {
            op = words.next().unwrap_or("");
        }
        let op = op.trim_end_matches(';');
        if op.is_empty() {
            continue;
        }
        k.instructions += 1;
        let count = |b: bool| u32::from(b);
        k.hmma += count(op.starts_with("HMMA"));
        k.ldsm += count(op.starts_with("LDSM"));
        let ldgsts = op.starts_with("LDGSTS");
        k.ldgsts += count(ldgsts);
        // Generic `LD.E.128`/`ST.E.128` count too: a pointer read from memory (a multi-tensor
        // table) is not provably global, so the compiler addresses it generically.
        let wide = op.contains(".128");
        k.ldg128 += count(wide && !ldgsts && (op.starts_with("LDG") || op.starts_with("LD.")));
        k.stg128 += count(wide && (op.starts_with("STG") || op.starts_with("ST.")));
        k.local += count(op.starts_with("LDL") || op.starts_with("STL"));
        k.bar += count(op.starts_with("BAR"));
    }
    out
}

/// What one kernel's SASS must not show: a tensor-core kernel
/// ([`steel_kernels::TENSOR_CORE_KERNELS`]) without HMMA or LDSM, local memory outside
/// [`steel_kernels::LOCAL_MEMORY_KERNELS`].
pub fn problems(c: &SassCounts) -> Vec<String> {
    let mut out = Vec::new();
    if steel_kernels::TENSOR_CORE_KERNELS.contains(&c.name.as_str()) && (c.hmma == 0 || c.ldsm == 0)
    {
        out.push(format!(
            "{}: written for the tensor cores but its SASS has {} HMMA and {} LDSM",
            c.name, c.hmma, c.ldsm
        ));
    }
    if steel_kernels::VECTOR_LOAD_KERNELS.contains(&c.name.as_str()) && c.ldg128 == 0 {
        out.push(format!(
            "{}: reads its aligned rows with 128-bit vector loads, but its SASS has no LDG.E.128",
            c.name
        ));
    }
    if c.local > 0 && !steel_kernels::LOCAL_MEMORY_KERNELS.contains(&c.name.as_str()) {
        out.push(format!("{}: {} local-memory instructions (LDL/STL)", c.name, c.local));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_the_opcodes_of_each_function() {
        let listing = "\tcode for sm_90\n\t\tFunction : k_fwd\n\
            \x20       /*0000*/                   LDC R1, c[0x0][0x28] ;  /* 0x00000a00ff017b82 */\n\
            \x20                                                             /* 0x000fe20000000800 */\n\
            \x20       /*0010*/              @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;\n\
            \x20       /*0020*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;\n\
            \x20       /*0030*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;\n\
            \x20       /*0040*/                   LDSM.16.M88.4 R12, [R2] ;\n\
            \x20       /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;\n\
            \x20       /*0060*/                   STL [R1], R2 ;\n\
            \t\tFunction : k_bwd\n\
            \x20       /*0000*/                   STG.E.128 desc[UR4][R2.64], R4 ;\n\
            \x20       /*0010*/                   EXIT ;\n";
        let k = parse(listing);
        assert_eq!(k.len(), 2);
        let want = SassCounts {
            name: "k_fwd".into(),
            instructions: 7,
            hmma: 1,
            ldsm: 1,
            ldg128: 1,
            stg128: 0,
            ldgsts: 1,
            local: 1,
            bar: 1,
        };
        assert_eq!(k[0], want);
        assert_eq!((k[1].name.as_str(), k[1].instructions, k[1].stg128), ("k_bwd", 2, 1));
    }

    #[test]
    fn tensor_core_kernels_need_hmma_and_nothing_but_the_stack_test_uses_local_memory() {
        let k = |name: &str, hmma, ldsm, local| SassCounts {
            name: name.into(),
            hmma,
            ldsm,
            local,
            ..SassCounts::default()
        };
        assert!(problems(&k("mma_tile_gemm_bf16", 8, 5, 0)).is_empty());
        assert!(problems(&k("mma_tile_gemm_bf16", 0, 5, 0))[0].contains("0 HMMA"));
        assert!(problems(&k("mma_tile_gemm_bf16", 8, 0, 0))[0].contains("0 LDSM"));
        assert!(problems(&k("add_rms_norm_fwd_f32", 0, 0, 2))[0].contains("local-memory"));
        assert!(problems(&k("emu_test_stack", 0, 0, 6)).is_empty());
    }
}
