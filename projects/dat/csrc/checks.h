// Input checks shared by the kernels: they read and write raw memory, so every tensor must be a
// contiguous CPU tensor of the dtype and shape they assume, and every index they follow must lie
// inside the tensor it indexes. The checks run once per call, outside the kernels' loops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <utility>

namespace dat {

// Each tensor is contiguous, on the CPU and of `dtype`; `what` names the group in the error.
inline void check_contiguous_cpu(std::initializer_list<const at::Tensor*> tensors, at::ScalarType dtype,
                                 const char* what) {
  for (const auto* t : tensors) {
    TORCH_CHECK(t->defined(), "expected ", dtype, " CPU tensors for ", what, ", got an undefined tensor");
    TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous() && t->device().is_cpu(), "expected contiguous ",
                dtype, " CPU tensors for ", what, ", got a ", t->is_contiguous() ? "contiguous " : "non-contiguous ",
                t->scalar_type(), " tensor on ", t->device());
  }
}

// The smallest and the largest of `count` int32 values (max < min where count is 0).
inline std::pair<int32_t, int32_t> min_max(const int32_t* values, int64_t count) {
  int32_t low = std::numeric_limits<int32_t>::max(), high = std::numeric_limits<int32_t>::min();
  for (int64_t i = 0; i < count; ++i) {
    low = std::min(low, values[i]);
    high = std::max(high, values[i]);
  }
  return {low, high};
}

// Every value of the contiguous int32 tensor `index` lies in [low, high]; `what` names it in the error.
inline void check_index_range(const at::Tensor& index, int64_t low, int64_t high, const char* what) {
  if (index.numel() == 0) return;
  const auto range = min_max(index.data_ptr<int32_t>(), index.numel());
  TORCH_CHECK(range.first >= low && range.second <= high, "expected ", what, " in [", low, ", ", high,
              "], got values from ", range.first, " to ", range.second);
}

}  // namespace dat
