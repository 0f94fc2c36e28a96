//! Official `torch.save` files (zip + pickle) through libtorch's `torch::pickle_load` in the C++ shim
//! (`csrc/shim.cpp`), which flattens nested dicts to dotted names.

use std::ffi::{c_char, c_void, CStr, CString};
use std::io::Read;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::{CheckpointError, StateDict};

type TensorCb = extern "C" fn(*mut c_void, *const c_char, *mut torch_sys::C_tensor);
type ScalarCb = extern "C" fn(*mut c_void, *const c_char, *const c_char);

extern "C" {
    fn xvlm_torch_load_flat(
        path: *const c_char,
        ctx: *mut c_void,
        tensor_cb: TensorCb,
        scalar_cb: ScalarCb,
    ) -> *mut c_char;
    fn xvlm_free_error(err: *mut c_char);
}

/// Everything in a `torch.save` file, flattened: `model.vision_encoder.norm.weight`, `config.image_res`.
#[derive(Debug, Default)]
pub struct TorchFile {
    /// Tensors by dotted path, in file order.
    pub tensors: Vec<(String, Tensor)>,
    /// Non-tensor leaves (ints, floats, bools, strings, None) as JSON, by dotted path.
    pub scalars: Vec<(String, serde_json::Value)>,
}

impl TorchFile {
    /// The state dict as the official loaders take it: `checkpoint['model']` if present, else everything.
    pub fn state_dict(self) -> StateDict {
        let has_model = self.tensors.iter().any(|(k, _)| k.starts_with("model."));
        self.tensors
            .into_iter()
            .filter_map(|(k, t)| {
                if !has_model {
                    Some((k, t))
                } else {
                    k.strip_prefix("model.").map(|s| (s.to_string(), t))
                }
            })
            .collect()
    }

    /// The saved `config` dict's leaves (`config.*` with the prefix removed).
    pub fn config(&self) -> Vec<(String, serde_json::Value)> {
        self.scalars
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("config.").map(|s| (s.to_string(), v.clone())))
            .collect()
    }
}

extern "C" fn on_tensor(ctx: *mut c_void, name: *const c_char, t: *mut torch_sys::C_tensor) {
    // SAFETY: ctx is the &mut TorchFile passed below; name is a NUL-terminated string valid for the
    // call; t is a heap `at::Tensor*` the shim gives away (tch's C_tensor is `at::Tensor*`).
    let file = unsafe { &mut *(ctx as *mut TorchFile) };
    let name = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
    let tensor = unsafe { Tensor::from_ptr(t) };
    file.tensors.push((name, tensor));
}

extern "C" fn on_scalar(ctx: *mut c_void, name: *const c_char, json: *const c_char) {
    // SAFETY: as in `on_tensor`.
    let file = unsafe { &mut *(ctx as *mut TorchFile) };
    let name = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
    let text = unsafe { CStr::from_ptr(json) }.to_string_lossy();
    let value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text.into_owned()));
    file.scalars.push((name, value));
}

fn format_err(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a zip-format `torch.save` file (PyTorch ≥ 1.6 default) into flattened tensors and scalars.
pub fn read_torch_file(path: &Path) -> Result<TorchFile, CheckpointError> {
    let open_err = |source| CheckpointError::Open {
        path: PathBuf::from(path),
        source,
    };
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path).map_err(open_err)?;
    let n = f.read(&mut magic).map_err(open_err)?;
    if n < 4 || &magic != b"PK\x03\x04" {
        let reason = if n >= 2 && magic[0] == 0x80 {
            "legacy (pre-1.6, non-zip) torch.save format; re-save it with \
             torch.save(obj, path, _use_new_zipfile_serialization=True)"
        } else {
            "not a zip-format torch.save file"
        };
        return Err(format_err(path, reason));
    }
    let c_path = CString::new(path.as_os_str().to_string_lossy().as_bytes())
        .map_err(|_| format_err(path, "path contains a NUL byte"))?;
    let mut file = TorchFile::default();
    // SAFETY: the callbacks only touch `file` through ctx during this call.
    let err = unsafe {
        xvlm_torch_load_flat(
            c_path.as_ptr(),
            &mut file as *mut TorchFile as *mut c_void,
            on_tensor,
            on_scalar,
        )
    };
    if !err.is_null() {
        // SAFETY: err is a malloc'd NUL-terminated string from the shim, freed once here.
        let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
        unsafe { xvlm_free_error(err) };
        let first = msg.lines().next().unwrap_or("").to_string();
        return Err(format_err(path, format!("libtorch pickle_load: {first}")));
    }
    Ok(file)
}
