//! Lets the fuzz targets find llama.cpp's shared libraries (which the
//! node's engine links) in the build folder, as `node/build.rs` does for
//! the `hypha` binary.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_HYPHA_LLAMA_LIB_DIR");
    if let Ok(dir) = std::env::var("DEP_HYPHA_LLAMA_LIB_DIR") {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{dir}");
    }
}
