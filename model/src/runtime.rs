//! What the process runs on: the libtorch it loaded, CUDA devices, NCCL, CPU threads. Used by
//! `xvlm doctor`, and by every binary at start-up to load libtorch's CUDA backend when it exists.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The libtorch version this build is pinned to (tch 0.24).
pub const REQUIRED_LIBTORCH: &str = "2.11.0";

extern "C" {
    fn xvlm_show_config() -> *mut c_char;
    fn xvlm_free_error(err: *mut c_char);
}

/// libtorch's build description, from the loaded library itself.
pub fn libtorch_build_config() -> String {
    // SAFETY: the shim returns a malloc'd NUL-terminated string that we free once copied.
    unsafe {
        let raw = xvlm_show_config();
        if raw.is_null() {
            return String::new();
        }
        let text = CStr::from_ptr(raw).to_string_lossy().into_owned();
        xvlm_free_error(raw);
        text
    }
}

/// The `TORCH_VERSION=x.y.z` libtorch was built as, without any `+cu130` suffix.
pub fn libtorch_version() -> Option<String> {
    parse_torch_version(&libtorch_build_config())
}

fn parse_torch_version(config: &str) -> Option<String> {
    let start = config.find("TORCH_VERSION=")? + "TORCH_VERSION=".len();
    let rest = &config[start..];
    let end = rest
        .find(|c: char| c == ',' || c.is_whitespace())
        .unwrap_or(rest.len());
    Some(
        rest[..end]
            .split('+')
            .next()
            .unwrap_or_default()
            .to_string(),
    )
}

/// The directory of the `libtorch_cpu.so` this process mapped.
pub fn libtorch_lib_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.ends_with("/libtorch_cpu.so"))
        .and_then(|path| Path::new(path).parent().map(Path::to_path_buf))
}

static CUDA_BACKEND: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Loads `libtorch_cuda.so` beside the mapped libtorch when it and its CUDA libraries can be loaded, so a
/// binary linked against the CPU-only venv still sees the GPUs of a CUDA libtorch at run time. Returns
/// the loaded path, or why not. Call before the first CUDA query; later calls return the first answer.
pub fn load_cuda_backend() -> &'static Result<PathBuf, String> {
    CUDA_BACKEND.get_or_init(|| {
        let dir = libtorch_lib_dir().ok_or("libtorch_cpu.so is not mapped")?;
        let path = dir.join("libtorch_cuda.so");
        if !path.exists() {
            return Err(format!("{} does not exist", path.display()));
        }
        // SAFETY: libtorch_cuda's initialisers only register the CUDA backend with the already-loaded
        // libtorch; RTLD_GLOBAL keeps its symbols visible to later dlopens (NCCL, cuBLAS plugins).
        let lib = unsafe {
            libloading::os::unix::Library::open(
                Some(&path),
                libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL,
            )
        }
        .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        std::mem::forget(lib);
        Ok(path)
    })
}

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone)]
pub struct CudaDevice {
    /// Ordinal.
    pub index: usize,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Total memory in bytes.
    pub total_memory: u64,
}

/// CUDA devices through the driver library (`libcuda.so.1`); empty without a driver.
pub fn cuda_devices() -> Vec<CudaDevice> {
    query_cuda_driver().unwrap_or_default()
}

fn query_cuda_driver() -> Option<Vec<CudaDevice>> {
    type CuInit = unsafe extern "C" fn(u32) -> c_int;
    type CuCount = unsafe extern "C" fn(*mut c_int) -> c_int;
    type CuGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
    type CuName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
    type CuMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;
    // SAFETY: the signatures are the CUDA driver API's; every out-pointer is a live local.
    unsafe {
        let lib = libloading::Library::new("libcuda.so.1").ok()?;
        let init: libloading::Symbol<CuInit> = lib.get(b"cuInit").ok()?;
        let count: libloading::Symbol<CuCount> = lib.get(b"cuDeviceGetCount").ok()?;
        let get: libloading::Symbol<CuGet> = lib.get(b"cuDeviceGet").ok()?;
        let name: libloading::Symbol<CuName> = lib.get(b"cuDeviceGetName").ok()?;
        let mem: libloading::Symbol<CuMem> = lib.get(b"cuDeviceTotalMem_v2").ok()?;
        if init(0) != 0 {
            return None;
        }
        let mut n = 0;
        if count(&mut n) != 0 {
            return None;
        }
        let mut devices = Vec::new();
        for index in 0..n {
            let mut dev = 0;
            if get(&mut dev, index) != 0 {
                continue;
            }
            let mut buf = [0 as c_char; 256];
            let mut total = 0usize;
            name(buf.as_mut_ptr(), buf.len() as c_int, dev);
            mem(&mut total, dev);
            devices.push(CudaDevice {
                index: index as usize,
                name: CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned(),
                total_memory: total as u64,
            });
        }
        Some(devices)
    }
}

/// Where libnccl was found and its version (e.g. 22809 = 2.28.9), or why it cannot be loaded.
pub fn nccl_version() -> Result<(PathBuf, i32), String> {
    type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
    let mut candidates: Vec<PathBuf> =
        vec![PathBuf::from("libnccl.so.2"), PathBuf::from("libnccl.so")];
    if let Some(dir) = libtorch_lib_dir() {
        candidates.push(dir.join("../../nvidia/nccl/lib/libnccl.so.2"));
    }
    let mut last_error = String::from("no candidate");
    for candidate in candidates {
        // SAFETY: loading libnccl runs no user code beyond its initialisers; ncclGetVersion writes one int.
        let loaded = unsafe { libloading::Library::new(&candidate) };
        match loaded {
            Ok(lib) => {
                let mut version = 0;
                let status = unsafe {
                    lib.get::<GetVersion>(b"ncclGetVersion")
                        .map(|f| f(&mut version))
                        .map_err(|e| e.to_string())?
                };
                if status != 0 {
                    return Err(format!("ncclGetVersion returned {status}"));
                }
                return Ok((candidate, version));
            }
            Err(e) => last_error = format!("{}: {e}", candidate.display()),
        }
    }
    Err(last_error)
}

/// Storage URL schemes this build can read and write.
pub fn storage_backends() -> Vec<&'static str> {
    let mut backends = vec!["file://", "s3://"];
    if cfg!(feature = "hdfs") {
        backends.push("hdfs://");
    }
    backends
}

/// Allows or forbids TF32 in CUDA matmuls and convolutions (parity checks need it off).
pub fn set_allow_tf32(allow: bool) {
    extern "C" {
        fn xvlm_set_allow_tf32(allow: bool);
    }
    // SAFETY: sets two flags on libtorch's global context; no CUDA needed.
    unsafe { xvlm_set_allow_tf32(allow) }
}

/// Enables or disables oneDNN (mkldnn) CPU convolutions, returning the previous setting.
pub fn set_mkldnn_enabled(enabled: bool) -> bool {
    extern "C" {
        fn xvlm_set_mkldnn_enabled(enabled: bool) -> bool;
    }
    // SAFETY: flips one flag on libtorch's global context.
    unsafe { xvlm_set_mkldnn_enabled(enabled) }
}

/// Runs `f` with oneDNN CPU convolutions off (ATen's reference kernels), restoring the setting after.
pub fn with_reference_cpu_kernels<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            set_mkldnn_enabled(self.0);
        }
    }
    let _restore = Restore(set_mkldnn_enabled(false));
    f()
}

/// Runs `f` with CUDA autocast (fp16 mixed precision) `enabled`, restoring the previous state after;
/// a plain call where CUDA is absent. Unlike `tch::autocast` it uses libtorch's per-device API, which
/// does not print a deprecation warning on every call.
pub fn autocast_cuda<T>(enabled: bool, f: impl FnOnce() -> T) -> T {
    extern "C" {
        fn xvlm_autocast_cuda_enter(enabled: bool) -> c_int;
        fn xvlm_autocast_cuda_exit(prev: c_int);
    }
    if !tch::Cuda::is_available() {
        return f();
    }
    // SAFETY: thread-local autocast flags and nesting counter of libtorch; nothing here throws.
    let prev = unsafe { xvlm_autocast_cuda_enter(enabled) };
    let out = f();
    // SAFETY: as above; pairs with the enter.
    unsafe { xvlm_autocast_cuda_exit(prev) };
    out
}

/// Pointer-sized handle for FFI users that need the current CUDA stream (NCCL).
pub fn current_cuda_stream(device: usize) -> *mut c_void {
    extern "C" {
        fn xvlm_current_cuda_stream(device: c_int) -> *mut c_void;
    }
    // SAFETY: the shim catches every C++ exception and returns null on failure.
    unsafe { xvlm_current_cuda_stream(device as c_int) }
}

#[cfg(test)]
mod tests {
    use super::parse_torch_version;

    #[test]
    fn parses_version_with_and_without_suffix() {
        let cfg = "Build settings: BLAS_INFO=open, TORCH_VERSION=2.11.0+cu130, USE_CUDA=ON";
        assert_eq!(parse_torch_version(cfg).as_deref(), Some("2.11.0"));
        assert_eq!(
            parse_torch_version("TORCH_VERSION=2.10.1").as_deref(),
            Some("2.10.1")
        );
        assert_eq!(parse_torch_version("nothing here"), None);
    }
}
