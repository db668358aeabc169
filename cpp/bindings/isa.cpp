// The module bprop._isa: which builds of the core this wheel holds, and which of
// them this CPU runs. It is compiled for baseline x86-64 (no -march) and holds no
// core code, so bprop/_loader.py can import it on any CPU before it picks a core;
// it is the one place that knows what an ISA level requires.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

struct Feature {
  const char* name;  // as the x86-64 psABI and Intel's manuals spell it
  bool present;
};

// The features -march=x86-64-vN may use beyond baseline x86-64, level by level
// (x86-64 psABI, "Micro-architecture levels"). __builtin_cpu_supports reads CPUID
// and, for AVX and AVX-512, also checks that the OS saves their registers (XGETBV).
// Its argument must be a string literal, hence the macro.
#if defined(__x86_64__) && defined(__GNUC__)
#define BPROP_FEATURE(label, gcc_name) Feature{label, __builtin_cpu_supports(gcc_name) != 0}

std::vector<Feature> features_of(const std::string& level) {
  std::vector<Feature> v2 = {
      BPROP_FEATURE("CMPXCHG16B", "cmpxchg16b"), BPROP_FEATURE("LAHF-SAHF", "lahf_lm"),
      BPROP_FEATURE("POPCNT", "popcnt"),         BPROP_FEATURE("SSE3", "sse3"),
      BPROP_FEATURE("SSE4.1", "sse4.1"),         BPROP_FEATURE("SSE4.2", "sse4.2"),
      BPROP_FEATURE("SSSE3", "ssse3")};
  std::vector<Feature> v3 = {
      BPROP_FEATURE("AVX", "avx"),     BPROP_FEATURE("AVX2", "avx2"),
      BPROP_FEATURE("BMI1", "bmi"),    BPROP_FEATURE("BMI2", "bmi2"),
      BPROP_FEATURE("F16C", "f16c"),   BPROP_FEATURE("FMA", "fma"),
      BPROP_FEATURE("LZCNT", "lzcnt"), BPROP_FEATURE("MOVBE", "movbe"),
      BPROP_FEATURE("OSXSAVE", "osxsave")};
  std::vector<Feature> v4 = {
      BPROP_FEATURE("AVX512F", "avx512f"),   BPROP_FEATURE("AVX512BW", "avx512bw"),
      BPROP_FEATURE("AVX512CD", "avx512cd"), BPROP_FEATURE("AVX512DQ", "avx512dq"),
      BPROP_FEATURE("AVX512VL", "avx512vl")};
  std::vector<Feature> out;
  if (level == "v3" || level == "v4") {
    out.insert(out.end(), v2.begin(), v2.end());
    out.insert(out.end(), v3.begin(), v3.end());
  }
  if (level == "v4") out.insert(out.end(), v4.begin(), v4.end());
  return out;
}

// GCC's own verdict on the whole level, as a cross-check of the list above.
bool gcc_says_runs(const std::string& level) {
  if (level == "v3") return __builtin_cpu_supports("x86-64-v3") != 0;
  if (level == "v4") return __builtin_cpu_supports("x86-64-v4") != 0;
  return true;
}
const std::vector<std::string> kLevels = {"baseline", "v3", "v4"};
#else
std::vector<Feature> features_of(const std::string&) { return {}; }
bool gcc_says_runs(const std::string&) { return true; }
const std::vector<std::string> kLevels = {"baseline"};
#endif

}  // namespace

PYBIND11_MODULE(_isa, m) {
  m.doc() = "Builds of bprop's core in this install, and the CPU's ISA levels (private)";
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
#endif
  m.attr("LEVELS") = py::tuple(py::cast(kLevels));
  // "portable" or "native" (BPROP_NATIVE=ON: one core, -march=native, no level)
  m.attr("BUILD") = BPROP_BUILD_KIND;
  // the levels of the cores a portable build holds, comma-separated
  std::vector<std::string> built;
  std::string list = BPROP_BUILT_LEVELS;
  for (std::size_t start = 0; start < list.size();) {
    std::size_t end = list.find(',', start);
    if (end == std::string::npos) end = list.size();
    if (end > start) built.push_back(list.substr(start, end - start));
    start = end + 1;
  }
  m.attr("BUILT_LEVELS") = py::tuple(py::cast(built));

  m.def("cpu_lacks", [](const std::string& level) {
    bool known = false;
    for (const auto& l : kLevels) known = known || l == level;
    if (!known) throw py::value_error("[cpu_lacks] unknown ISA level '" + level + "'");
    std::vector<std::string> lacks;
    for (const auto& f : features_of(level))
      if (!f.present) lacks.emplace_back(f.name);
    if (lacks.empty() && !gcc_says_runs(level))
      lacks.emplace_back("a feature of x86-64-" + level + " (GCC's CPU check says no)");
    return lacks;
  }, py::arg("level"),
  "The features of an ISA level ('baseline', 'v3', 'v4') this CPU lacks; empty if it runs it.");
}
