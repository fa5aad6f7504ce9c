//! Embeds `web/dist` (built by `scripts/install-dashboard.sh`: npm ci, npm run build)
//! into the binary. When it has not been built, the crate compiles with no assets and
//! serves a page naming the missing step instead.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("web/dist");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut code = String::from(
        "/// The built assets: (path under dist, bytes).\npub(crate) static ASSETS: &[(&str, &[u8])] = &[\n",
    );
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut files: Vec<_> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .collect();
        files.sort_by_key(std::fs::DirEntry::file_name);
        for e in files {
            let path = e.path();
            println!("cargo:rerun-if-changed={}", path.display());
            let name = e.file_name().to_string_lossy().into_owned();
            let _ = writeln!(
                code,
                "    ({name:?}, include_bytes!({:?})),",
                path.display().to_string()
            );
        }
    }
    code.push_str("];\n");
    let out = Path::new(&std::env::var("OUT_DIR").unwrap_or_default()).join("assets.rs");
    if let Err(e) = std::fs::write(&out, code) {
        panic!("writing {}: {e}", out.display());
    }
}
