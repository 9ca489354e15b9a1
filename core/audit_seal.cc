#include "core/audit_seal.h"

#include "audit/record.h"

namespace custos::core {

Bytes SealAuditRecord(std::span<const uint8_t> prev_hash, const storage::AuditRow& row) {
  return audit::ChainHash(prev_hash, ToAuditRecord(row));
}

audit::Record ToAuditRecord(const storage::AuditRow& row) {
  audit::Record record;
  record.seq = row.seq;
  record.time = row.time;
  record.principal = row.principal;
  record.role = row.role;
  record.action = row.action;
  record.key_id = row.key_id;
  record.key_version = row.key_version;
  record.source_key_id = row.source_key_id;
  record.source_key_version = row.source_key_version;
  record.request_id = row.request_id;
  record.outcome = row.outcome;
  record.peer = row.peer;
  record.context_hmac = row.context_hmac;
  record.detail = row.detail;
  record.hash = row.hash;
  return record;
}

}  // namespace custos::core
