#include "tests/audit/audit_test_util.h"

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <catch2/catch.hpp>

namespace custos::audit::test {

Record VectorRecord() {
  Record record;
  record.seq = 1;
  record.time = 1700000000;
  record.principal = "alice";
  record.role = "app";
  record.action = "Encrypt";
  record.key_id = "k1";
  record.key_version = 1;
  record.outcome = "OK";
  record.peer = "10.0.0.5:4711";
  record.format = 1;  // the frozen format 1 vector
  return record;
}

Record SampleRecord(int n) {
  static const char* kActions[] = {"Encrypt", "Decrypt", "GenerateDataKey", "ReEncrypt",
                                   "CreateKey"};
  Record record;
  record.time = 1700000000 + n;
  record.principal = "spiffe://custos.test/app/billing-" + std::to_string(n % 3);
  record.role = n % 4 == 0 ? "officer" : "app";
  record.action = kActions[n % 5];
  record.key_id = n % 7 == 0 ? "" : "00000000-0000-4000-8000-00000000000" + std::to_string(n % 10);
  record.key_version = n % 7 == 0 ? 0 : 1 + n % 3;
  if (record.action == "ReEncrypt") {
    record.source_key_id = "00000000-0000-4000-8000-000000000099";
    record.source_key_version = 2;
  }
  record.request_id = n % 6 == 0 ? "req-" + std::to_string(n) : "";
  record.outcome = n % 5 == 1 ? "PERMISSION_DENIED" : "OK";
  record.peer = "ipv4:10.0.0." + std::to_string(n % 250) + ":4711";
  record.context_hmac = n % 2 == 0 ? ToHex(Bytes(32, static_cast<uint8_t>(n))) : "";
  record.detail = n % 9 == 0 ? "policy sha256=abc" : "";
  record.call_id = n % 3 == 0 ? "call-" + std::to_string(n) : "";
  record.row = n % 4 == 1 ? "key:" + record.key_id : "";
  record.row_digest = record.row.empty() ? "" : ToHex(Bytes(32, static_cast<uint8_t>(n)));
  return record;
}

std::vector<Record> SealedLog(int count) {
  std::vector<Record> records;
  Chain chain;
  for (int n = 1; n <= count; ++n) {
    records.push_back(SampleRecord(n));
    chain.Seal(records.back());
  }
  return records;
}

void Reseal(std::vector<Record>& records, size_t from_index) {
  Bytes prev = from_index == 0 ? Bytes(kHashBytes, 0) : records[from_index - 1].hash;
  for (size_t i = from_index; i < records.size(); ++i) {
    records[i].hash = ChainHash(prev, records[i]);
    prev = records[i].hash;
  }
}

TestSigningKey::TestSigningKey() : key_(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256")) {
  REQUIRE(key_ != nullptr);
}

TestSigningKey::~TestSigningKey() { EVP_PKEY_free(key_); }

std::string TestSigningKey::PublicPem() const {
  BIO* bio = BIO_new(BIO_s_mem());
  REQUIRE(PEM_write_bio_PUBKEY(bio, key_) == 1);
  char* data = nullptr;
  const long size = BIO_get_mem_data(bio, &data);
  std::string pem(data, static_cast<size_t>(size));
  BIO_free(bio);
  return pem;
}

Bytes TestSigningKey::Sign(std::string_view message) const {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  REQUIRE(EVP_DigestSignInit(ctx, nullptr, EVP_sha256(), nullptr, key_) == 1);
  size_t size = 0;
  const auto* data = reinterpret_cast<const unsigned char*>(message.data());
  REQUIRE(EVP_DigestSign(ctx, nullptr, &size, data, message.size()) == 1);
  Bytes signature(size);
  REQUIRE(EVP_DigestSign(ctx, signature.data(), &size, data, message.size()) == 1);
  signature.resize(size);
  EVP_MD_CTX_free(ctx);
  return signature;
}

std::vector<Checkpoint> TestSigningKey::ChainedCheckpoints(const std::vector<Record>& records,
                                                           const std::vector<uint64_t>& seqs,
                                                           int64_t time) const {
  std::vector<Checkpoint> chained;
  for (uint64_t seq : seqs) {
    Checkpoint checkpoint;
    checkpoint.seq = seq;
    checkpoint.hash = records.at(seq - 1).hash;
    checkpoint.time = time;
    checkpoint.key_label = "custos-audit-signing";
    checkpoint.prev_seq = chained.empty() ? 0 : chained.back().seq;
    checkpoint.prev_hash = chained.empty() ? Bytes(32, 0) : chained.back().hash;
    checkpoint.signature = Sign(CheckpointMessage(checkpoint));
    chained.push_back(std::move(checkpoint));
  }
  return chained;
}

Checkpoint TestSigningKey::CheckpointAt(const std::vector<Record>& records, uint64_t seq,
                                        int64_t time) const {
  Checkpoint checkpoint;
  checkpoint.seq = seq;
  checkpoint.hash = records.at(seq - 1).hash;
  checkpoint.time = time;
  checkpoint.key_label = "custos-audit-signing";
  checkpoint.format = 1;
  checkpoint.signature = Sign(CheckpointMessage(checkpoint));
  return checkpoint;
}

}  // namespace custos::audit::test
