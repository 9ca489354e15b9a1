// How stored audit rows are sealed into the chain: the canonical encoding and hash defined
// once in audit/record.h (see docs/AUDIT.md), applied to storage's rows.
#pragma once

#include <span>

#include "audit/record.h"
#include "common/secure_bytes.h"
#include "storage/key_store.h"

namespace custos::core {

// SHA-256(prev_hash || canonical(record)): the store's AuditSealer.
Bytes SealAuditRecord(std::span<const uint8_t> prev_hash, const storage::AuditRow& row);
audit::Record ToAuditRecord(const storage::AuditRow& row);

}  // namespace custos::core
