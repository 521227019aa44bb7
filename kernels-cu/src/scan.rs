// Shared by build.rs (`include!`) and the library: what the kernel sources declare, read line by
// line outside `//` comments (the sources use no block comments).

/// One `__global__` function of a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelDecl {
    pub name: String,
    /// The first argument of its `__launch_bounds__(…)` as written (`128`, `MMA_THREADS`), if any.
    pub bounds: Option<String>,
    /// 1-based line of the declaration.
    pub line: usize,
}

fn code_of(line: &str) -> &str {
    line.split("//").next().unwrap_or("")
}

/// The text inside the parentheses that open at `open` (a `(`), or None if they do not close
/// on this line.
fn parenthesised(text: &str, open: usize) -> Option<&str> {
    let mut depth = 0usize;
    for (i, c) in text[open..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[open + 1..open + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// The `__global__` functions of `source`, in source order: for each line with `__global__`, the
/// identifier just before the first `(` that does not belong to `__launch_bounds__(…)`.
pub fn kernel_decls(source: &str) -> Vec<KernelDecl> {
    let mut out = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let code = code_of(line);
        let Some(pos) = code.find("__global__") else { continue };
        let mut rest = &code[pos + "__global__".len()..];
        let mut bounds = None;
        while let Some(paren) = rest.find('(') {
            let head = rest[..paren].trim_end();
            let start =
                head.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(0, |i| i + 1);
            let name = &head[start..];
            if name == "__launch_bounds__" {
                let Some(args) = parenthesised(rest, paren) else { break };
                bounds = args.split(',').next().map(|a| a.trim().to_string());
                rest = &rest[paren + args.len() + 2..];
                continue;
            }
            if !name.is_empty() {
                out.push(KernelDecl { name: name.to_string(), bounds, line: n + 1 });
            }
            break;
        }
    }
    out
}

/// The names of the `__global__` functions of `source`, in source order.
pub fn global_symbols(source: &str) -> Vec<String> {
    kernel_decls(source).into_iter().map(|k| k.name).collect()
}

/// 1-based lines that use `__shared__` directly. Only the `STEEL_SHARED*` macro definitions of
/// steel_common.cuh may (a `#define STEEL_…` line and its continuation lines).
pub fn raw_shared_lines(source: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut in_steel_define = false;
    for (n, line) in source.lines().enumerate() {
        let code = code_of(line);
        let starts_define = code.trim_start().starts_with("#define STEEL_");
        if code.contains("__shared__") && !(in_steel_define || starts_define) {
            out.push(n + 1);
        }
        let continues = code.trim_end().ends_with('\\');
        in_steel_define = (in_steel_define || starts_define) && continues;
    }
    out
}

/// Every barrier call of `source` — `__syncthreads()` and `__syncwarp(…)` — in source order, as
/// (1-based line, byte range within the line). The mutation check removes them one at a time.
pub fn barrier_sites(source: &str) -> Vec<(usize, std::ops::Range<usize>)> {
    let mut out = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let code = code_of(line);
        let mut from = 0;
        loop {
            let next = ["__syncthreads(", "__syncwarp("]
                .iter()
                .filter_map(|pat| code[from..].find(pat).map(|i| (from + i, pat.len())))
                .min();
            let Some((at, len)) = next else { break };
            // a call, not a declaration or a longer identifier
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                from = at + len;
                continue;
            }
            match parenthesised(code, at + len - 1) {
                Some(args) => {
                    let end = at + len + args.len() + 1;
                    out.push((n + 1, at..end));
                    from = end;
                }
                None => break,
            }
        }
    }
    out
}
