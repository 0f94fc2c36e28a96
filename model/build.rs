//! Links libtorch (rpath, CUDA) and compiles the C++ shim: the current CUDA stream for NCCL, TF32
//! switches and libtorch's build config, none of which tch exposes.

#[path = "build/libtorch_link.rs"]
mod libtorch_link;

fn main() {
    libtorch_link::emit_link_args();
    let lib = libtorch_link::libtorch_lib_dir();
    let include = lib.join("../include");
    println!("cargo:rerun-if-changed=csrc/shim.cpp");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("csrc/shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .compile("xvlm_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
