// Shared by the build scripts of every crate that links libtorch (included with `#[path]`).
//
// torch-sys only adds libtorch's rpath to its own compile, and as-needed linking drops libtorch_cuda, so
// each linking crate adds both itself: binaries then run without LD_LIBRARY_PATH, and on a CUDA venv
// they really see the GPUs.

use std::path::{Path, PathBuf};

/// The libtorch lib dir torch-sys found (its `links = "tch"` metadata).
pub fn libtorch_lib_dir() -> PathBuf {
    let dir = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report DEP_TCH_LIBTORCH_LIB: depend on torch-sys directly");
    PathBuf::from(dir)
}

/// Emits the rpath (libtorch and the project's `.libs` with the NCCL symlink) and, only with the CUDA
/// libraries installed, a forced link of libtorch_cuda.
pub fn emit_link_args() {
    let lib = libtorch_lib_dir();
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if let Ok(libs) = std::env::var("XVLM_LIBS_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{libs}");
    }
    if has_cuda_libraries(&lib) {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        println!("cargo:rustc-cfg=xvlm_linked_cuda");
    }
    println!("cargo:rustc-check-cfg=cfg(xvlm_linked_cuda)");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=XVLM_LIBS_DIR");
}

/// The CPU-only recipe ships libtorch_cuda.so but not its CUDA dependencies; linking it then would make
/// every binary fail to load, so the full wheel set is detected by cuBLAS being present.
fn has_cuda_libraries(lib: &Path) -> bool {
    lib.join("libtorch_cuda.so").exists()
        && (lib.join("../../nvidia/cu13/lib/libcublas.so.13").exists()
            || lib.join("../../nvidia/cublas/lib/libcublas.so.13").exists()
            || lib.join("libcublas.so").exists())
}
