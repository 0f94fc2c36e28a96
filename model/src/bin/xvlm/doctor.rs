//! `xvlm doctor`.

use anyhow::{bail, Result};
use xvlm_model::runtime;

pub fn run() -> Result<()> {
    let version = runtime::libtorch_version();
    let lib_dir = runtime::libtorch_lib_dir();
    println!(
        "libtorch version: {}",
        version.as_deref().unwrap_or("unknown")
    );
    println!(
        "libtorch path:    {}",
        lib_dir
            .as_ref()
            .map_or("unknown".into(), |p| p.display().to_string())
    );
    match runtime::load_cuda_backend() {
        Ok(path) => println!("libtorch cuda:    loaded {}", path.display()),
        Err(why) => println!("libtorch cuda:    not loaded ({why})"),
    }
    println!("cuda available:   {}", tch::Cuda::is_available());
    println!("cudnn available:  {}", tch::Cuda::cudnn_is_available());
    let devices = runtime::cuda_devices();
    println!(
        "cuda devices:     {} (libtorch sees {})",
        devices.len(),
        tch::Cuda::device_count()
    );
    for d in &devices {
        println!(
            "  cuda:{} {} {:.1} GiB",
            d.index,
            d.name,
            d.total_memory as f64 / (1u64 << 30) as f64
        );
    }
    match runtime::nccl_version() {
        Ok((path, v)) => println!(
            "nccl:             {}.{}.{} ({})",
            v / 10000,
            (v / 100) % 100,
            v % 100,
            path.display()
        ),
        Err(why) => println!("nccl:             not loadable ({why})"),
    }
    println!(
        "cpu threads:      {} (available parallelism {})",
        tch::get_num_threads(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "storage backends: {}",
        runtime::storage_backends().join(" ")
    );
    match version.as_deref() {
        Some(runtime::REQUIRED_LIBTORCH) => Ok(()),
        Some(other) => bail!(
            "libtorch {other} is loaded but xvlm needs {}: run scripts/setup.sh, or point LIBTORCH at a 2.11 build and rebuild",
            runtime::REQUIRED_LIBTORCH
        ),
        None => bail!("cannot tell the libtorch version from its build config"),
    }
}
