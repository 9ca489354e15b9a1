// Reads what the kernel says about the mapping holding an address, from /proc/self/smaps.
#pragma once

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>

namespace custos {

// The sanitizers' runtimes replace mlock with a no-op that reports success, so in their builds
// nothing is ever locked and the tests cannot check it.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr bool kMlockIsReal = false;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
inline constexpr bool kMlockIsReal = false;
#else
inline constexpr bool kMlockIsReal = true;
#endif
#else
inline constexpr bool kMlockIsReal = true;
#endif

struct MappingInfo {
  bool found = false;
  size_t locked_kb = 0;  // "Locked:": bytes of the mapping mlock'd, in kB
  std::string vm_flags;  // "VmFlags:", e.g. "rd wr mr mw me lo ac dd"

  bool locked() const { return locked_kb > 0 && HasFlag("lo"); }
  bool dont_dump() const { return HasFlag("dd"); }
  bool HasFlag(const std::string& flag) const {
    return (" " + vm_flags + " ").find(" " + flag + " ") != std::string::npos;
  }
};

inline MappingInfo MappingOf(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  std::ifstream smaps("/proc/self/smaps");
  MappingInfo info;
  bool inside = false;
  std::string line;
  while (std::getline(smaps, line)) {
    unsigned long start = 0, end = 0;  // NOLINT(google-runtime-int): what %lx takes
    char dash_check = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx %c", &start, &end, &dash_check) == 3) {
      if (inside) break;  // past the mapping we wanted
      inside = start <= address && address < end;
      info.found = info.found || inside;
    } else if (inside && line.rfind("Locked:", 0) == 0) {
      info.locked_kb = std::stoul(line.substr(7));
    } else if (inside && line.rfind("VmFlags:", 0) == 0) {
      info.vm_flags = line.substr(line.find_first_not_of(' ', 8));
      while (!info.vm_flags.empty() && info.vm_flags.back() == ' ') info.vm_flags.pop_back();
    }
  }
  return info;
}

}  // namespace custos
