//! Run-time kernel compilation with NVRTC, straight to a cubin.
//!
//! cudarc's safe NVRTC API yields PTX (which the driver would JIT again at load time, without a
//! report); this module uses its `sys` bindings for `nvrtcGetCUBIN` and the program log instead.
//! Every compile passes `--ptxas-options=-v`, so the log carries ptxas's register, shared-memory,
//! stack and spill lines ([`super::ptxas`]). Results are cached on disk ([`super::cache`]).
//!
//! Options of every compile: `--gpu-architecture=<arch>` (a real `sm_XY[a]`: a cubin, not PTX),
//! `-std=c++17`, `-lineinfo` (source lines in Nsight), `--ptxas-options=-v`, `-DSTEEL_NVRTC=1`,
//! and `-I` for each discovered include directory ([`super::headers`]). Kernel headers of the
//! project (`kernels-cu/include/`) are passed in memory, by include name.

use super::cache::{CacheKey, CubinCache, Entry};
use super::headers::{self, IncludeDirs};
use super::libs::{self, CudaLib};
use super::ptxas::{self, KernelReport};
use super::{CudaError, Result};
use cudarc::nvrtc::sys;
use std::ffi::{c_char, CString};
use std::fmt;

/// A real GPU architecture for ptxas: `sm_90`, `sm_90a`, `sm_100`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Arch(String);

impl Arch {
    /// The architecture of a device of compute capability `major.minor`.
    pub fn from_compute_capability(major: i32, minor: i32) -> Arch {
        Arch(format!("sm_{major}{minor}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Arch {
    type Err = CudaError;
    /// Accepts `sm_90`, `sm_90a`, `compute capability` digits `90`, and `9.0`.
    fn from_str(s: &str) -> Result<Arch> {
        let t = s.trim().to_ascii_lowercase();
        let digits = if let Some(rest) = t.strip_prefix("sm_") {
            rest.to_string()
        } else if let Some((a, b)) = t.split_once('.') {
            format!("{a}{b}")
        } else {
            t.clone()
        };
        let (num, suffix) = match digits.strip_suffix(['a', 'f']) {
            Some(n) => (n, &digits[n.len()..]),
            None => (digits.as_str(), ""),
        };
        if num.len() < 2 || !num.chars().all(|c| c.is_ascii_digit()) {
            return Err(CudaError::invalid(
                "arch",
                format!("{s:?} is not a GPU architecture (expected e.g. sm_90)"),
            ));
        }
        Ok(Arch(format!("sm_{num}{suffix}")))
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One `.cu` translation unit.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    /// File name shown in diagnostics (`rms_norm.cu`).
    pub name: &'a str,
    pub text: &'a str,
}

/// The result of compiling one source.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    /// NVRTC's program log (front-end diagnostics and ptxas's `-v` report).
    pub log: String,
    /// Whether the cubin came from the disk cache.
    pub cached: bool,
}

impl Compiled {
    /// ptxas's report for each entry function.
    pub fn kernels(&self) -> Vec<KernelReport> {
        ptxas::parse(&self.log)
    }

    /// The log's warning lines.
    pub fn warnings(&self) -> Vec<String> {
        ptxas::warnings(&self.log)
    }
}

/// NVRTC's `(major, minor)` version.
pub fn version() -> Result<(i32, i32)> {
    libs::require(CudaLib::Nvrtc)?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are valid for writes.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::nvrtc("nvrtcVersion", e))?;
    Ok((major, minor))
}

/// The compiler: NVRTC's version, the include directories and the cache.
#[derive(Clone, Debug)]
pub struct Compiler {
    version: (i32, i32),
    include: IncludeDirs,
    cache: Option<CubinCache>,
}

impl Compiler {
    /// Loads NVRTC (an error when missing), finds the CUDA headers, and uses `cache` when given.
    pub fn new(cache: Option<CubinCache>) -> Result<Compiler> {
        let version = version()?;
        // After `nvrtcVersion` the library is mapped, so its folder is known to the discovery.
        let include = headers::discover()?;
        headers::check_version(&include, version)?;
        Ok(Compiler { version, include, cache })
    }

    /// A compiler with explicit include directories (tests, unusual installs).
    pub fn with_includes(include: IncludeDirs, cache: Option<CubinCache>) -> Result<Compiler> {
        Ok(Compiler { version: version()?, include, cache })
    }

    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    pub fn include_dirs(&self) -> &IncludeDirs {
        &self.include
    }

    pub fn cache(&self) -> Option<&CubinCache> {
        self.cache.as_ref()
    }

    /// The NVRTC options for `arch`, `extra` appended.
    pub fn options(&self, arch: &Arch, extra: &[String]) -> Vec<String> {
        let mut o = vec![
            format!("--gpu-architecture={arch}"),
            "-std=c++17".to_string(),
            "-lineinfo".to_string(),
            "--ptxas-options=-v".to_string(),
            "-DSTEEL_NVRTC=1".to_string(),
        ];
        o.extend(self.include.options());
        o.extend(extra.iter().cloned());
        o
    }

    /// Compiles `src` (with the in-memory `headers`, `(include name, text)`) for `arch`: from
    /// the cache when an identical compile is there, else with NVRTC (and stored).
    pub fn compile(
        &self,
        src: Source,
        headers: &[(&str, &str)],
        arch: &Arch,
        extra: &[String],
    ) -> Result<Compiled> {
        let options = self.options(arch, extra);
        let key = CacheKey {
            nvrtc_version: self.version,
            arch: arch.as_str(),
            options: &options,
            source_name: src.name,
            source: src.text,
            headers,
        };
        if let Some(cache) = &self.cache {
            if let Some(Entry { cubin, log }) = cache.get(&key)? {
                return Ok(Compiled { cubin, log, cached: true });
            }
        }
        let (cubin, log) = compile_uncached(src, headers, arch, &options)?;
        if let Some(cache) = &self.cache {
            cache.put(&key, &Entry { cubin: cubin.clone(), log: log.clone() })?;
        }
        Ok(Compiled { cubin, log, cached: false })
    }
}

fn cstring(what: &'static str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| CudaError::invalid(what, format!("{s:?} contains a NUL byte")))
}

/// Destroys an NVRTC program when dropped (on every path out of the compile).
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed once, here.
        unsafe {
            let _ = sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

fn log_of(prog: &Program) -> Result<String> {
    let mut size = 0usize;
    // SAFETY: `prog` is a live program; the buffer has the size NVRTC reported.
    unsafe {
        sys::nvrtcGetProgramLogSize(prog.0, &mut size)
            .result()
            .map_err(|e| CudaError::nvrtc("nvrtcGetProgramLogSize", e))?;
        let mut buf = vec![0u8; size.max(1)];
        sys::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr() as *mut c_char)
            .result()
            .map_err(|e| CudaError::nvrtc("nvrtcGetProgramLog", e))?;
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }
}

fn compile_uncached(
    src: Source,
    headers: &[(&str, &str)],
    arch: &Arch,
    options: &[String],
) -> Result<(Vec<u8>, String)> {
    libs::require(CudaLib::Nvrtc)?;
    let text = cstring("source", src.text)?;
    let name = cstring("source name", src.name)?;
    let header_texts =
        headers.iter().map(|(_, t)| cstring("header", t)).collect::<Result<Vec<_>>>()?;
    let header_names =
        headers.iter().map(|(n, _)| cstring("header name", n)).collect::<Result<Vec<_>>>()?;
    let header_text_ptrs: Vec<*const c_char> = header_texts.iter().map(|c| c.as_ptr()).collect();
    let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
    let opts = options.iter().map(|o| cstring("option", o)).collect::<Result<Vec<_>>>()?;
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|c| c.as_ptr()).collect();

    let mut raw = std::ptr::null_mut();
    // SAFETY: every pointer refers to a NUL-terminated string that outlives the program (the
    // CStrings above live until the end of this function, after `Program` is dropped); the
    // header arrays both have `headers.len()` entries.
    let prog = unsafe {
        sys::nvrtcCreateProgram(
            &mut raw,
            text.as_ptr(),
            name.as_ptr(),
            headers.len() as i32,
            header_text_ptrs.as_ptr(),
            header_name_ptrs.as_ptr(),
        )
        .result()
        .map_err(|e| CudaError::nvrtc("nvrtcCreateProgram", e))?;
        Program(raw)
    };
    // SAFETY: `prog` is live; `opt_ptrs` holds `opts.len()` valid C strings.
    let rc = unsafe { sys::nvrtcCompileProgram(prog.0, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    let log = log_of(&prog)?;
    if rc != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Compile {
            source_name: src.name.to_string(),
            arch: arch.to_string(),
            log: if log.trim().is_empty() { format!("{rc:?}") } else { log },
        });
    }
    let mut size = 0usize;
    // SAFETY: `prog` compiled successfully for a real architecture, so it has a cubin of the
    // reported size; the buffer is that large.
    let cubin = unsafe {
        sys::nvrtcGetCUBINSize(prog.0, &mut size)
            .result()
            .map_err(|e| CudaError::nvrtc("nvrtcGetCUBINSize", e))?;
        let mut buf = vec![0u8; size];
        if size > 0 {
            sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr() as *mut c_char)
                .result()
                .map_err(|e| CudaError::nvrtc("nvrtcGetCUBIN", e))?;
        }
        buf
    };
    if cubin.is_empty() {
        return Err(CudaError::invalid(
            "nvrtcGetCUBIN",
            format!(
                "NVRTC produced no cubin for {} ({arch} must be a real sm_ architecture)",
                src.name
            ),
        ));
    }
    Ok((cubin, log))
}
