//! What this node offers: CUDA devices through libtorch, otherwise N CPU slots.

use xvlm_proto::v1;

/// Which devices to announce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// CUDA devices when libtorch sees any, else CPU slots.
    Auto,
    /// CPU slots only.
    Cpu,
}

/// The devices to register with.
pub fn detect(choice: DeviceChoice, cpu_slots: u32) -> Vec<v1::Device> {
    if choice == DeviceChoice::Auto {
        let _ = xvlm_model::runtime::load_cuda_backend();
        let count = tch::Cuda::device_count();
        if count > 0 {
            let named = xvlm_model::runtime::cuda_devices();
            return (0..count as u32)
                .map(|i| {
                    let info = named.iter().find(|d| d.index == i as usize);
                    v1::Device {
                        kind: v1::DeviceKind::Cuda as i32,
                        index: i,
                        name: info
                            .map(|d| d.name.clone())
                            .unwrap_or_else(|| format!("cuda:{i}")),
                        memory_bytes: info.map(|d| d.total_memory).unwrap_or(0),
                    }
                })
                .collect();
        }
    }
    (0..cpu_slots.max(1))
        .map(|i| v1::Device {
            kind: v1::DeviceKind::Cpu as i32,
            index: i,
            name: format!("cpu-slot-{i}"),
            memory_bytes: 0,
        })
        .collect()
}
