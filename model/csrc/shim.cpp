// The libtorch entry points tch does not expose. Errors come back as malloc'd strings, never as
// C++ exceptions crossing into Rust.
//
// Official torch.save checkpoints are NOT read here: libtorch's pickle_load turns every
// collections.OrderedDict (hence every state_dict) into None; model/src/checkpoint/torch_pickle.rs reads them.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cstring>
#include <string>

extern "C" {
void xvlm_free_error(char *err) { free(err); }

// The raw cudaStream_t libtorch currently uses on `device`, for NCCL; null when CUDA is absent.
void *xvlm_current_cuda_stream(int device) {
  try {
    auto *impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    return impl->getStream(c10::Device(c10::DeviceType::CUDA, (c10::DeviceIndex)device)).native_handle();
  } catch (const std::exception &) {
    return nullptr;
  }
}

// libtorch's own build description (at::show_config), which names the TORCH_VERSION it was built as.
char *xvlm_show_config() {
  try {
    return strdup(at::show_config().c_str());
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}

// TF32 matmuls/convolutions on Ampere+ change float32 results; parity checks turn them off.
void xvlm_set_allow_tf32(bool allow) {
  at::globalContext().setAllowTF32CuBLAS(allow);
  at::globalContext().setAllowTF32CuDNN(allow);
}

// oneDNN (mkldnn) convolutions on the CPU; returns the previous setting. Parity replays turn them off:
// oneDNN's convolution backward is less accurate on some CPUs (AMD EPYC: 1.7e-5 relative in a gradient
// norm, above the fixtures' 1e-5) while ATen's own kernels reproduce the fixtures on every machine.
bool xvlm_set_mkldnn_enabled(bool enabled) {
  bool prev = at::globalContext().userEnabledMkldnn();
  at::globalContext().setUserEnabledMkldnn(enabled);
  return prev;
}

// CUDA autocast through the per-device API: tch's autocast calls at::autocast::is_enabled/set_enabled,
// which libtorch 2.11 deprecates with a warning on every call (three log lines per training step).
// Enter returns the previous state for exit to restore; nesting and the cast cache as in torch.autocast.
int xvlm_autocast_cuda_enter(bool enabled) {
  bool prev = at::autocast::is_autocast_enabled(at::kCUDA);
  at::autocast::set_autocast_enabled(at::kCUDA, enabled);
  at::autocast::increment_nesting();
  return prev ? 1 : 0;
}

void xvlm_autocast_cuda_exit(int prev) {
  if (at::autocast::decrement_nesting() == 0) {
    at::autocast::clear_cache();
  }
  at::autocast::set_autocast_enabled(at::kCUDA, prev != 0);
}
}
