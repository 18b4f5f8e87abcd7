// Input checks shared by the kernels: they read raw memory, so every tensor must be a contiguous
// CPU tensor of the dtype they assume.
#pragma once

#include <torch/extension.h>

#include <initializer_list>

namespace dat {

// Each tensor is contiguous, on the CPU and of `dtype`; `what` names the group in the error.
inline void check_contiguous_cpu(std::initializer_list<const torch::Tensor*> tensors, torch::ScalarType dtype,
                                 const char* what) {
  for (const auto* t : tensors) {
    TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous() && t->device().is_cpu(), "expected contiguous ",
                dtype, " CPU tensors for ", what, ", got a ", t->is_contiguous() ? "contiguous " : "non-contiguous ",
                t->scalar_type(), " tensor on ", t->device());
  }
}

}  // namespace dat
