//! Source lines for the emulator's reports. The checker marks a code address in its messages as
//! `@@src:<stem>:<kernel>:<hex offset>@@` (the offset inside the kernel's function); build.rs
//! keeps the kernels' object files, with line tables, in OUT_DIR and names them in
//! `STEEL_EMU_OBJECTS` (`stem=path;…`). Each marker becomes `(at file:line, inlined at
//! file:line …)` through binutils' `addr2line`, or `(at kernel+0xoff)` when the object or the
//! tool is missing (a prebuilt binary carried to another machine, say).

use std::process::Command;

const OBJECTS: &str = env!("STEEL_EMU_OBJECTS");

fn object_of(stem: &str) -> Option<&'static str> {
    OBJECTS.split(';').find_map(|kv| kv.strip_prefix(stem)?.strip_prefix('='))
}

/// `file:line` of each inlining level, innermost first, with the function it lies in.
fn lines(object: &str, kernel: &str, offset: &str) -> Option<Vec<(String, String)>> {
    let out = Command::new("addr2line")
        .args(["-f", "-i", "-C", "-e", object, "-j", &format!(".text.{kernel}"), offset])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let all: Vec<&str> = text.lines().collect();
    let frames: Vec<(String, String)> = all
        .chunks(2)
        .filter_map(|c| {
            let (func, at) = (c.first()?, c.get(1)?);
            let at = at.split(" (discriminator").next().unwrap_or(at);
            let (file, line) = at.rsplit_once(':')?;
            if file.starts_with("??") || line.starts_with('?') || line == "0" {
                return None;
            }
            let file = file.rsplit('/').next().unwrap_or(file);
            Some((format!("{file}:{line}"), func.to_string()))
        })
        .collect();
    (!frames.is_empty()).then_some(frames)
}

fn describe(marker: &str) -> String {
    let mut parts = marker.splitn(3, ':');
    let (Some(stem), Some(kernel), Some(off)) = (parts.next(), parts.next(), parts.next()) else {
        return String::new();
    };
    let offset = format!("0x{off}");
    match object_of(stem).and_then(|o| lines(o, kernel, &offset)) {
        Some(frames) => {
            let at: Vec<String> = frames.iter().map(|(at, f)| format!("{at} in {f}")).collect();
            format!("(at {})", at.join(", inlined at "))
        }
        None => format!("(at {kernel}+{offset})"),
    }
}

/// `msg` with every source marker replaced by what it points at.
pub fn resolve(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(start) = rest.find("@@src:") {
        out += &rest[..start];
        let after = &rest[start + "@@src:".len()..];
        let Some(end) = after.find("@@") else {
            out += &rest[start..];
            return out;
        };
        out += &describe(&after[..end]);
        rest = &after[end + 2..];
    }
    out + rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_without_an_object_keep_the_kernel_offset() {
        assert_eq!(resolve("a @@src:nosuchstem:k_fwd:1f@@ b"), "a (at k_fwd+0x1f) b");
        assert_eq!(resolve("no marker"), "no marker");
        assert_eq!(resolve("cut @@src:x"), "cut @@src:x");
    }
}
