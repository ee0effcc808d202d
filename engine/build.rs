//! Build glue between llama-cpp-sys-2 and hypha.
//!
//! - Tells the engine where ggml's dynamically loaded backends (CPU variants,
//!   CUDA, ...) were installed, as a last-resort search path at run time.
//! - Passes the folder of llama.cpp's shared libraries on to crates that link
//!   a binary (`DEP_HYPHA_LLAMA_LIB_DIR`), so they can set an rpath.
//! - Puts links to those libraries beside the build's binaries. llama-cpp-sys-2
//!   hard-links only the unversioned `libX.so` names there, which are
//!   themselves symlinks to `libX.so.0`; without the versioned names they
//!   dangle, binaries cannot load them, and a rerun of its build script fails
//!   with "File exists".
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_LLAMA_BACKENDS_DIR");
    println!("cargo:rerun-if-env-changed=DEP_LLAMA_ROOT");
    if let Ok(dir) = std::env::var("DEP_LLAMA_BACKENDS_DIR") {
        println!("cargo:rustc-env=HYPHA_BUILD_BACKENDS_DIR={dir}");
    }
    let Ok(root) = std::env::var("DEP_LLAMA_ROOT") else {
        return;
    };
    let lib = Path::new(&root).join("lib");
    println!("cargo:lib_dir={}", lib.display());
    if let Some(profile_dir) = profile_dir() {
        for dir in [
            profile_dir.clone(),
            profile_dir.join("deps"),
            profile_dir.join("examples"),
        ] {
            link_libraries(&lib, &dir);
        }
    }
}

/// `target/<profile>`: three levels above this build script's OUT_DIR.
fn profile_dir() -> Option<PathBuf> {
    let out = PathBuf::from(std::env::var_os("OUT_DIR")?);
    out.ancestors().nth(3).map(Path::to_path_buf)
}

fn link_libraries(lib: &Path, dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(lib) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        if !(name_str.starts_with("lib") && name_str.contains(".so")) {
            continue;
        }
        let dst = dir.join(&name);
        // `exists` follows links: a dangling link counts as missing.
        if dst.exists() {
            continue;
        }
        let _ = std::fs::remove_file(&dst);
        #[cfg(unix)]
        if let Err(e) = std::os::unix::fs::symlink(entry.path(), &dst) {
            println!("cargo:warning=cannot link {}: {e}", dst.display());
        }
    }
}
