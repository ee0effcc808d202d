//! Lets `hypha` and the test binaries find llama.cpp's shared libraries
//! (libllama, libggml): first beside the executable (`$ORIGIN`, for an
//! installed copy with its libraries next to it), then in the build folder.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_HYPHA_LLAMA_LIB_DIR");
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN");
    if let Ok(dir) = std::env::var("DEP_HYPHA_LLAMA_LIB_DIR") {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,{dir}");
        println!("cargo:rustc-link-arg-tests=-Wl,-rpath,{dir}");
    }
}
