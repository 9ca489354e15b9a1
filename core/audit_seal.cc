#include "core/audit_seal.h"

#include <openssl/evp.h>

#include <string>

namespace custos::core {
namespace {

void Append(Bytes& out, std::string_view field) {
  const auto size = static_cast<uint32_t>(field.size());
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(size >> shift));
  out.insert(out.end(), field.begin(), field.end());
}

}  // namespace

Bytes CanonicalAuditRecord(const storage::AuditRow& row) {
  static constexpr std::string_view kMagic = "custos-audit-v1";
  Bytes out(kMagic.begin(), kMagic.end());
  Append(out, std::to_string(row.seq));
  Append(out, std::to_string(row.time));
  Append(out, row.principal);
  Append(out, row.role);
  Append(out, row.action);
  Append(out, row.key_id);
  Append(out, std::to_string(row.key_version));
  Append(out, row.source_key_id);
  Append(out, std::to_string(row.source_key_version));
  Append(out, row.request_id);
  Append(out, row.outcome);
  Append(out, row.peer);
  Append(out, row.context_hmac);
  Append(out, row.detail);
  return out;
}

Bytes SealAuditRecord(std::span<const uint8_t> prev_hash, const storage::AuditRow& row) {
  const Bytes canonical = CanonicalAuditRecord(row);
  Bytes hash(32);
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  EVP_DigestUpdate(ctx, prev_hash.data(), prev_hash.size());
  EVP_DigestUpdate(ctx, canonical.data(), canonical.size());
  unsigned int length = 0;
  EVP_DigestFinal_ex(ctx, hash.data(), &length);
  EVP_MD_CTX_free(ctx);
  return hash;
}

std::string Hex(std::span<const uint8_t> bytes) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  for (uint8_t b : bytes) {
    hex.push_back(kHex[b >> 4]);
    hex.push_back(kHex[b & 0x0f]);
  }
  return hex;
}

std::string CheckpointMessage(uint64_t seq, std::span<const uint8_t> hash, int64_t time) {
  return "custos-audit-checkpoint-v1\nseq=" + std::to_string(seq) + "\nhash=" + Hex(hash) +
         "\ntime=" + std::to_string(time) + "\n";
}

}  // namespace custos::core
