// Shared by build.rs (`include!`) and the library: the kernel symbols of a .cu source.

/// The names of the `__global__` functions of `source`, in source order: for each line with
/// `__global__` outside a `//` comment, the identifier just before the first `(` that does
/// not belong to `__launch_bounds__(…)`.
pub fn global_symbols(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let Some(pos) = code.find("__global__") else { continue };
        let mut rest = &code[pos + "__global__".len()..];
        while let Some(paren) = rest.find('(') {
            let head = rest[..paren].trim_end();
            let start =
                head.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(0, |i| i + 1);
            let name = &head[start..];
            if name == "__launch_bounds__" {
                let Some(close) = rest[paren..].find(')') else { break };
                rest = &rest[paren + close + 1..];
                continue;
            }
            if !name.is_empty() {
                out.push(name.to_string());
            }
            break;
        }
    }
    out
}
