// SPDX-License-Identifier: Apache-2.0
// Glue between tvm-ffi TensorViews and mlcq::LinearArgs, used by linear.cu's exports and by the
// BYOC wrappers that mlc_quant.cuda_dispatch generates (one typed function per composite).
#pragma once

#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>

#include "mlcq_api.h"

namespace mlcq {

// A DLTensor view of a TensorView (whose shape array must outlive it). Rejects strided views:
// the kernels assume compact row-major tensors.
class DLView {
 public:
  DLView() = default;
  explicit DLView(const tvm::ffi::TensorView& t, const char* what) {
    if (!t.IsContiguous()) {
      TVM_FFI_THROW(ValueError) << "mlc_quant: " << what << " must be a contiguous tensor";
    }
    t_.data = t.data_ptr();
    t_.device = t.device();
    t_.ndim = t.ndim();
    t_.dtype = t.dtype();
    t_.shape = const_cast<int64_t*>(t.shape().data());
    t_.strides = nullptr;
    t_.byte_offset = t.byte_offset();
    set_ = true;
  }
  explicit DLView(const tvm::ffi::Optional<tvm::ffi::TensorView>& t, const char* what) {
    if (t.has_value()) *this = DLView(*t, what);
  }
  const DLTensor* get() const { return set_ ? &t_ : nullptr; }

 private:
  DLTensor t_{};
  bool set_ = false;
};

}  // namespace mlcq
