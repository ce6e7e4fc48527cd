// A tensor over memory it does not own, whose storage keeps an owner alive:
// libtorch calls the deleter when the last tensor (view, slice, clone of the
// handle, VarStore variable) using the storage is gone, and the deleter
// drops the Rust-side reference to the mapping. tch's from_blob has no
// deleter, so without this a view could outlive the mapping.
#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <exception>

extern "C" void zerocopy_loader_release(void *owner);

extern "C" void *zerocopy_loader_tensor_over(void *data, const int64_t *dims, size_t ndims, int scalar_type,
                                             void *owner, char **error) {
  try {
    auto options = at::TensorOptions().dtype(static_cast<at::ScalarType>(scalar_type)).device(at::kCPU);
    at::Tensor t = at::from_blob(
        data, at::IntArrayRef(dims, ndims), [owner](void *) { zerocopy_loader_release(owner); }, options);
    return new at::Tensor(std::move(t));
  } catch (const std::exception &e) {
    *error = strdup(e.what());
    return nullptr;
  }
}

extern "C" void zerocopy_loader_free_error(char *error) { free(error); }
