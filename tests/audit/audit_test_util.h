// Helpers shared by the audit tests: a sealed sample log, and a P-256 key standing in for the
// HSM's checkpoint signing key (same signature format: DER ECDSA over SHA-256).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "audit/record.h"

struct evp_pkey_st;

namespace custos::audit::test {

// Record number `n` (unsealed: seq 0, no hash) with fields that vary with n, some empty.
// The example record of docs/AUDIT.md (seq 1, no hash).
Record VectorRecord();
Record SampleRecord(int n);

// A log of `count` records, sealed by a Chain.
std::vector<Record> SealedLog(int count);

// Reseals records[from_index..] after an edit: a consistent forgery by someone who holds the
// database but not the signing key.
void Reseal(std::vector<Record>& records, size_t from_index);

class TestSigningKey {
 public:
  TestSigningKey();  // a fresh P-256 key pair
  ~TestSigningKey();
  TestSigningKey(const TestSigningKey&) = delete;
  TestSigningKey& operator=(const TestSigningKey&) = delete;

  std::string PublicPem() const;
  // DER ECDSA signature over SHA-256(message), as the HSM makes it.
  Bytes Sign(std::string_view message) const;
  // A format 1 checkpoint of `records[seq - 1]` (naming no predecessor), signed by this key.
  Checkpoint CheckpointAt(const std::vector<Record>& records, uint64_t seq,
                          int64_t time = 1800000000) const;
  // Format 2 checkpoints at `seqs` (ascending), each naming the one before it.
  std::vector<Checkpoint> ChainedCheckpoints(const std::vector<Record>& records,
                                             const std::vector<uint64_t>& seqs,
                                             int64_t time = 1800000000) const;

 private:
  evp_pkey_st* key_;
};

}  // namespace custos::audit::test
