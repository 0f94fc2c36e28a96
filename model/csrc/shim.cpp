// The two libtorch entry points tch does not expose. Errors come back as malloc'd strings, never as
// C++ exceptions crossing into Rust.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <ATen/Context.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" {
typedef void (*xvlm_tensor_cb)(void *ctx, const char *name, at::Tensor *tensor);
typedef void (*xvlm_scalar_cb)(void *ctx, const char *name, const char *json_value);

static std::string key_string(const c10::IValue &k) {
  if (k.isString()) return k.toStringRef();
  if (k.isInt()) return std::to_string(k.toInt());
  return "?";
}

static std::string json_escape(const std::string &s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') { out += '\\'; out += c; }
    else if (c == '\n') out += "\\n";
    else if ((unsigned char)c < 0x20) out += ' ';
    else out += c;
  }
  return out + "\"";
}

// Walks nested dicts/lists/tuples; tensors go to `tf`, plain scalars and strings (e.g. the saved config)
// to `sf` as JSON literals, keyed by their dotted path.
static void flatten(const c10::IValue &v, const std::string &p, void *ctx, xvlm_tensor_cb tf,
                    xvlm_scalar_cb sf) {
  auto join = [&](const std::string &k) { return p.empty() ? k : p + "." + k; };
  if (v.isTensor()) {
    tf(ctx, p.c_str(), new at::Tensor(v.toTensor()));
  } else if (v.isGenericDict()) {
    for (const auto &kv : v.toGenericDict()) flatten(kv.value(), join(key_string(kv.key())), ctx, tf, sf);
  } else if (v.isList()) {
    auto l = v.toListRef();
    for (size_t i = 0; i < l.size(); ++i) flatten(l[i], join(std::to_string(i)), ctx, tf, sf);
  } else if (v.isTuple()) {
    const auto &l = v.toTupleRef().elements();
    for (size_t i = 0; i < l.size(); ++i) flatten(l[i], join(std::to_string(i)), ctx, tf, sf);
  } else if (sf != nullptr) {
    if (v.isInt()) sf(ctx, p.c_str(), std::to_string(v.toInt()).c_str());
    else if (v.isDouble()) sf(ctx, p.c_str(), std::to_string(v.toDouble()).c_str());
    else if (v.isBool()) sf(ctx, p.c_str(), v.toBool() ? "true" : "false");
    else if (v.isString()) sf(ctx, p.c_str(), json_escape(v.toStringRef()).c_str());
    else if (v.isNone()) sf(ctx, p.c_str(), "null");
  }
}

char *xvlm_torch_load_flat(const char *path, void *ctx, xvlm_tensor_cb tf, xvlm_scalar_cb sf) {
  try {
    std::ifstream in(path, std::ios::binary);
    if (!in) return strdup("cannot open file");
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    flatten(torch::jit::pickle_load(bytes), "", ctx, tf, sf);
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}

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
}
