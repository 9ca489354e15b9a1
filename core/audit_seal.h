// The audit chain's seal: hash = SHA-256(prev_hash || canonical(record)), with the frozen
// canonical encoding "custos-audit-v1" followed by every field, in order, as a u32 big-endian
// length and its bytes (integers as decimal text). See docs/AUDIT.md.
#pragma once

#include <span>

#include "common/secure_bytes.h"
#include "storage/key_store.h"

namespace custos::core {

Bytes CanonicalAuditRecord(const storage::AuditRow& row);
Bytes SealAuditRecord(std::span<const uint8_t> prev_hash, const storage::AuditRow& row);

// The exact text a checkpoint signs (ECDSA P-256 over its SHA-256), so that an auditor can run
// `openssl dgst -sha256 -verify audit.pem -signature checkpoint.sig checkpoint.msg`.
std::string CheckpointMessage(uint64_t seq, std::span<const uint8_t> hash, int64_t time);
std::string Hex(std::span<const uint8_t> bytes);

}  // namespace custos::core
