#include "core/encryption_context.h"

#include "common/strings.h"

namespace custos::core {
namespace {

void AppendU32(uint32_t v, WipedBytes& out) {
  out.push_back(static_cast<uint8_t>(v >> 24));
  out.push_back(static_cast<uint8_t>(v >> 16));
  out.push_back(static_cast<uint8_t>(v >> 8));
  out.push_back(static_cast<uint8_t>(v));
}

void AppendString(const std::string& s, WipedBytes& out) {
  AppendU32(static_cast<uint32_t>(s.size()), out);
  out.insert(out.end(), s.begin(), s.end());
}

}  // namespace

absl::Status ValidateContext(const EncryptionContext& context) {
  if (context.size() > kMaxContextEntries) {
    return absl::InvalidArgumentError(StrCat("encryption context has ", context.size(),
                                             " entries; at most ", kMaxContextEntries,
                                             " are allowed"));
  }
  size_t total = 0;
  for (const auto& [key, value] : context) {
    if (key.empty()) return absl::InvalidArgumentError("encryption context has an empty key");
    if (key.size() > kMaxContextKeyBytes) {
      return absl::InvalidArgumentError(StrCat("encryption context key is ", key.size(),
                                               " bytes; at most ", kMaxContextKeyBytes,
                                               " are allowed"));
    }
    total += key.size() + value.size();
  }
  if (total > kMaxContextBytes) {
    return absl::InvalidArgumentError(StrCat("encryption context holds ", total, " bytes; at most ",
                                             kMaxContextBytes, " are allowed"));
  }
  return absl::OkStatus();
}

void AppendCanonicalContext(const EncryptionContext& context, WipedBytes& out) {
  AppendU32(static_cast<uint32_t>(context.size()), out);
  for (const auto& [key, value] : context) {  // std::map iterates in byte-wise key order.
    AppendString(key, out);
    AppendString(value, out);
  }
}

}  // namespace custos::core
