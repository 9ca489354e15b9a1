// The audit log's records and checkpoints between their gRPC form (custos.v1) and the audit
// library's, for AuditService, custosctl and the tests that read the log over gRPC. Hashes
// travel as lower-case hex; a malformed one becomes empty, which the verifier then names. Times
// are whole Unix seconds in the log (what is hashed and signed) and Timestamps on the wire.
#pragma once

#include "audit/record.h"
#include "custos/v1/audit_service.pb.h"

namespace custos::server {

inline audit::Record FromProto(const custos::v1::AuditRecord& r) {
  audit::Record record;
  record.seq = r.seq();
  record.time = r.time().seconds();
  record.principal = r.principal();
  record.role = r.role();
  record.action = r.action();
  record.key_id = r.key_id();
  record.key_version = r.key_version();
  record.source_key_id = r.source_key_id();
  record.source_key_version = r.source_key_version();
  record.request_id = r.request_id();
  record.outcome = r.outcome();
  record.peer = r.peer();
  record.context_hmac = r.context_hmac();
  record.detail = r.detail();
  record.format = r.format() == 0 ? 1 : r.format();
  record.call_id = r.call_id();
  record.row = r.row();
  record.row_digest = r.row_digest();
  record.hash = audit::FromHex(r.hash()).value_or(Bytes{});
  return record;
}

inline void ToProto(const audit::Record& record, custos::v1::AuditRecord* out) {
  out->set_seq(record.seq);
  out->mutable_time()->set_seconds(record.time);
  out->set_principal(record.principal);
  out->set_role(record.role);
  out->set_action(record.action);
  out->set_key_id(record.key_id);
  out->set_key_version(record.key_version);
  out->set_source_key_id(record.source_key_id);
  out->set_source_key_version(record.source_key_version);
  out->set_request_id(record.request_id);
  out->set_outcome(record.outcome);
  out->set_peer(record.peer);
  out->set_context_hmac(record.context_hmac);
  out->set_detail(record.detail);
  out->set_format(record.format);
  out->set_call_id(record.call_id);
  out->set_row(record.row);
  out->set_row_digest(record.row_digest);
  out->set_hash(audit::ToHex(record.hash));
}

inline audit::Checkpoint FromProto(const custos::v1::Checkpoint& c) {
  audit::Checkpoint checkpoint;
  checkpoint.seq = c.seq();
  checkpoint.hash = audit::FromHex(c.hash()).value_or(Bytes{});
  checkpoint.time = c.time().seconds();
  checkpoint.signature.assign(c.signature().begin(), c.signature().end());
  checkpoint.key_label = c.key_label();
  checkpoint.format = c.format() == 0 ? 1 : c.format();
  checkpoint.prev_seq = c.prev_seq();
  checkpoint.prev_hash = audit::FromHex(c.prev_hash()).value_or(Bytes{});
  return checkpoint;
}

inline void ToProto(const audit::Checkpoint& checkpoint, custos::v1::Checkpoint* out) {
  out->set_seq(checkpoint.seq);
  out->set_hash(audit::ToHex(checkpoint.hash));
  out->mutable_time()->set_seconds(checkpoint.time);
  out->set_key_label(checkpoint.key_label);
  out->set_message(audit::CheckpointMessage(checkpoint));
  out->set_signature(std::string(checkpoint.signature.begin(), checkpoint.signature.end()));
  out->set_format(checkpoint.format);
  out->set_prev_seq(checkpoint.prev_seq);
  out->set_prev_hash(audit::ToHex(checkpoint.prev_hash));
}

}  // namespace custos::server
