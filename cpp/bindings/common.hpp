// Helpers shared by the binding files: strict array checks and NumPy views.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bprop/types.hpp"

namespace bprop::python {

namespace py = pybind11;

void bind_network(py::module_& m);
void bind_kernels(py::module_& m);

template <typename T>
std::string dtype_name() {
  return std::string(py::str(py::dtype::of<T>()));
}

inline std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

/// Checks that `obj` is an aligned, C-contiguous ndarray of exactly dtype T and
/// `ndim` dimensions, and returns it without a copy. Anything else is a
/// TypeError (not an array, wrong dtype) or a ValueError (ndim, layout) that
/// says how to fix it: a silent conversion would hide a copy.
template <typename T>
py::array_t<T> strict_array(py::handle obj, const char* where, const char* name, int ndim) {
  const std::string tag = std::string("[") + where + "] " + name;
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(tag + " must be a numpy.ndarray of dtype " + dtype_name<T>() +
                         ", but got " + std::string(Py_TYPE(obj.ptr())->tp_name));
  }
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().equal(py::dtype::of<T>())) {
    throw py::type_error(tag + " must have dtype " + dtype_name<T>() + ", but has dtype " +
                         std::string(py::str(a.dtype())) +
                         "; convert it once with np.ascontiguousarray(" + name + ", dtype=np." +
                         dtype_name<T>() + ")");
  }
  if (a.ndim() != ndim) {
    throw py::value_error(tag + " must be " + std::to_string(ndim) + "-D" +
                          (ndim == 2 ? " (batch, features)" : "") + ", but has shape " +
                          shape_of(a));
  }
  const int flags = a.flags();
  if (!(flags & py::array::c_style) ||
      !(flags & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
    throw py::value_error(tag + " must be C-contiguous (row-major) and aligned, but it is "
                          "not (a transposed, strided or Fortran-ordered view?); pass "
                          "np.ascontiguousarray(" + name + ")");
  }
  return py::reinterpret_borrow<py::array_t<T>>(obj);
}

template <typename T>
void require_writeable(const py::array_t<T>& a, const char* where, const char* name) {
  if (!a.writeable()) {
    throw py::value_error(std::string("[") + where + "] " + name + " must be writeable");
  }
}

inline void mark_readonly(py::array& a) {
  py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
}

/// A row-major NumPy view of `rows x cols` elements at the start of `storage`.
/// The view holds a reference to the storage, so it never dangles.
template <typename T>
py::array view_of(const StoragePtr<T>& storage, std::vector<py::ssize_t> shape,
                  bool writeable) {
  auto* holder = new StoragePtr<T>(storage);
  py::capsule base(holder, [](void* p) { delete static_cast<StoragePtr<T>*>(p); });
  py::array a(py::dtype::of<T>(), std::move(shape), {}, storage->data(), base);
  if (!writeable) mark_readonly(a);
  return a;
}

}  // namespace bprop::python
