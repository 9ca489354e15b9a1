#include "storage/row_codec.h"

#include <openssl/sha.h>

#include <string>

#include "common/strings.h"

namespace custos::storage {
namespace {

constexpr std::string_view kMagic = "custos-row-v1";

class Encoder {
 public:
  explicit Encoder(std::string_view name) {
    out_.assign(kMagic.begin(), kMagic.end());
    Field(name);
  }
  Encoder& Field(std::string_view bytes) {
    const auto size = static_cast<uint32_t>(bytes.size());
    for (int shift = 24; shift >= 0; shift -= 8)
      out_.push_back(static_cast<uint8_t>(size >> shift));
    out_.insert(out_.end(), bytes.begin(), bytes.end());
    return *this;
  }
  Encoder& Field(std::span<const uint8_t> bytes) {
    return Field(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
  }
  Encoder& Number(int64_t value) { return Field(std::to_string(value)); }
  Encoder& Count(size_t value) { return Number(static_cast<int64_t>(value)); }
  Bytes Done() { return std::move(out_); }

 private:
  Bytes out_;
};

}  // namespace

std::string KeyRowName(std::string_view key_id) { return StrCat("key:", key_id); }
std::string RequestRowName(std::string_view request_id) { return StrCat("request:", request_id); }
std::string UsageRowName(std::string_view key_id, uint32_t version) {
  return StrCat("usage:", key_id, "/", version);
}
std::string SettingRowName(std::string_view name) { return StrCat("setting:", name); }

Bytes CanonicalKeyRow(const KeyRecord& key) {
  Encoder e(KeyRowName(key.id));
  e.Field(key.alias).Field(key.description).Count(key.tags.size());
  for (const auto& [name, value] : key.tags) e.Field(name).Field(value);
  e.Number(static_cast<int64_t>(key.state))
      .Number(key.created_at)
      .Field(key.created_by)
      .Number(key.primary_version)
      .Count(key.versions.size());
  for (const KeyVersion& v : key.versions) {
    e.Number(v.version).Field(v.wrapped).Field(v.root_key_label).Number(v.created_at);
  }
  e.Count(key.encrypt_grants.size());
  for (const std::string& p : key.encrypt_grants) e.Field(p);
  e.Count(key.decrypt_grants.size());
  for (const std::string& p : key.decrypt_grants) e.Field(p);
  e.Number(key.min_decrypt_version)
      .Number(key.rotation_period_seconds)
      .Number(key.deletion_due_at)
      .Number(key.destroyed_at)
      .Number(key.deletion_due_observed);
  // Only when there are any, so a row written before they were kept encodes as it did.
  if (!key.reserved_versions.empty()) {
    e.Count(key.reserved_versions.size());
    for (uint32_t version : key.reserved_versions) e.Number(version);
  }
  return e.Done();
}

Bytes CanonicalRequestRow(const RequestRecord& r) {
  Encoder e(RequestRowName(r.id));
  e.Field(r.operation)
      .Field(r.key_id)
      .Field(r.parameters)
      .Field(r.justification)
      .Field(r.proposer)
      .Number(r.created_at)
      .Number(r.expires_at)
      .Number(static_cast<int64_t>(r.state))
      .Count(r.approvals.size());
  for (const Approval& a : r.approvals) e.Field(a.principal).Number(a.at);
  return e.Field(r.rejected_by).Field(r.reason).Number(r.closed_at).Done();
}

Bytes CanonicalUsageRow(const VersionUsage& usage) {
  return Encoder(UsageRowName(usage.key_id, usage.version))
      .Number(static_cast<int64_t>(usage.encryptions_reserved))
      .Done();
}

Bytes CanonicalSettingRow(std::string_view name, std::string_view value) {
  return Encoder(SettingRowName(name)).Field(value).Done();
}

std::string RowDigest(std::span<const uint8_t> canonical) {
  uint8_t digest[SHA256_DIGEST_LENGTH];
  SHA256(canonical.data(), canonical.size(), digest);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  hex.reserve(2 * sizeof digest);
  for (uint8_t b : digest) {
    hex.push_back(kHex[b >> 4]);
    hex.push_back(kHex[b & 0x0f]);
  }
  return hex;
}

}  // namespace custos::storage
