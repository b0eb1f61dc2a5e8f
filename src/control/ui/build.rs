//! Embeds the admin UI's built assets (`src/control/ui/dist`, written by `npm run build` there)
//! into the binary, so one binary serves `/ui` and the Rust build never needs Node.
//!
//! It writes `$OUT_DIR/ui_assets.rs`: one `include_bytes!` per file of `dist` (and of its `.gz`
//! sibling, which the UI build writes for text assets), or an empty list when `dist` is absent;
//! `src/control/ui.rs` then serves a page saying how to build the UI. No crate is needed for this:
//! `include_bytes!` tracks each file, and the few lines here are all the walking there is.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const UI_DIR: &str = "src/control/ui";

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let dist = manifest.join(UI_DIR).join("dist");
    // Watch `dist` when it exists (a rebuild of the UI re-embeds it); otherwise the UI folder, so
    // the first `npm run build` is noticed. Never a missing path: Cargo would rerun every build.
    if dist.is_dir() {
        println!("cargo:rerun-if-changed={UI_DIR}/dist");
    } else {
        println!("cargo:rerun-if-changed={UI_DIR}");
    }
    println!("cargo:rerun-if-changed=src/control/ui/build.rs");

    let mut files = Vec::new();
    if dist.is_dir() {
        walk(&dist, &mut files);
    }
    files.sort();
    let mut out = String::from("/// The admin UI's built files (empty: not built).\n");
    out.push_str("pub static ASSETS: &[Asset] = &[\n");
    for file in &files {
        let rel = file.strip_prefix(&dist).expect("under dist");
        let rel = rel.to_string_lossy().replace('\\', "/");
        if rel.ends_with(".gz") {
            continue;
        }
        let gz = PathBuf::from(format!("{}.gz", file.display()));
        let gzip = if gz.is_file() {
            format!("Some(include_bytes!({:?}))", gz.display().to_string())
        } else {
            "None".to_string()
        };
        writeln!(
            out,
            "    Asset {{ path: {rel:?}, body: include_bytes!({:?}), gzip: {gzip} }},",
            file.display().to_string()
        )
        .expect("writing to a String");
    }
    out.push_str("];\n");
    let target = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    std::fs::write(target.join("ui_assets.rs"), out).expect("write ui_assets.rs");
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}
