// The lowbit op namespace; each kernel file adds its ops with TORCH_LIBRARY_FRAGMENT(lowbit, m).
#include "common.h"

namespace lowbit {
// Returns 1: lets Python confirm the library is loaded and the namespace exists.
int64_t native_version() { return 1; }
}  // namespace lowbit

TORCH_LIBRARY(lowbit, m) { m.def("native_version() -> int"); }
TORCH_LIBRARY_IMPL(lowbit, CompositeExplicitAutograd, m) { m.impl("native_version", &lowbit::native_version); }
