//! Tells the engine where llama-cpp-sys-2 put ggml's dynamically loaded
//! backends (CPU variants, CUDA, ...), as a last-resort search path, and
//! passes the folder of llama.cpp's shared libraries on to crates that link
//! a binary (`DEP_HYPHA_LLAMA_LIB_DIR`), so they can set an rpath.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_LLAMA_BACKENDS_DIR");
    println!("cargo:rerun-if-env-changed=DEP_LLAMA_ROOT");
    if let Ok(dir) = std::env::var("DEP_LLAMA_BACKENDS_DIR") {
        println!("cargo:rustc-env=HYPHA_BUILD_BACKENDS_DIR={dir}");
    }
    if let Ok(root) = std::env::var("DEP_LLAMA_ROOT") {
        let lib = std::path::Path::new(&root).join("lib");
        println!("cargo:lib_dir={}", lib.display());
    }
}
