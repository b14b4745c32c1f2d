// SPDX-License-Identifier: Apache-2.0
// The Python module cifd_kernels._C. Importing it runs the static
// TORCH_LIBRARY registrations of every python/*.cpp (the cifd_C:: ops); the
// module itself only carries build facts for `python -m cifd_kernels info`.
#include <Python.h>

#ifndef CIFD_CUDA_ARCHS
#define CIFD_CUDA_ARCHS ""
#endif
#ifndef CIFD_TORCH_VERSION
#define CIFD_TORCH_VERSION ""
#endif
#ifndef CIFD_CUDA_VERSION
#define CIFD_CUDA_VERSION ""
#endif

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "cifd_kernels compiled kernels",
                                   -1, nullptr};
  PyObject* m = PyModule_Create(&def);
  if (m == nullptr) return nullptr;
#ifdef CIFD_WITH_CUDA
  PyModule_AddObject(m, "WITH_CUDA", Py_NewRef(Py_True));
#else
  PyModule_AddObject(m, "WITH_CUDA", Py_NewRef(Py_False));
#endif
#ifdef _OPENMP
  PyModule_AddIntConstant(m, "OPENMP", _OPENMP);
#else
  PyModule_AddIntConstant(m, "OPENMP", 0);
#endif
  PyModule_AddStringConstant(m, "CUDA_ARCHS", CIFD_CUDA_ARCHS);
  PyModule_AddStringConstant(m, "TORCH_VERSION", CIFD_TORCH_VERSION);
  PyModule_AddStringConstant(m, "CUDA_VERSION", CIFD_CUDA_VERSION);
  PyModule_AddStringConstant(m, "COMPILER", __VERSION__);
  return m;
}
}
