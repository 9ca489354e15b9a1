// The offline verifier over an arbitrary JSON Lines export (audit/verifier.h). The first input
// byte chooses how much of the export to make authentic first, so that the fuzzer reaches the
// checks behind the hash chain and the signatures, which it could not forge:
//   bit 0  re-seal: give each record, in file order, the chain hash it would have there;
//   bit 1  re-sign: sign each checkpoint with the fuzz key (made at start, P-256);
//   bit 2  re-hash: give each checkpoint the hash of the record at its seq, and the hash of
//          the checkpoint before it as prev_hash (before signing);
//   bit 3  anchor: use the last checkpoint line as the anchor.
// The rest is the export. Nothing may escape as an exception or a sanitizer report, and the
// report must agree with itself: ok means no bad record and every record checked; a failure
// names its reason.
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "audit/record.h"
#include "audit/verifier.h"
#include "fuzz/fuzz_check.h"

namespace custos::audit {
namespace {

struct FuzzKey {
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key{EVP_EC_gen("P-256"), EVP_PKEY_free};
  std::unique_ptr<PublicKeyVerifier> verifier;

  FuzzKey() {
    FUZZ_CHECK(key != nullptr);
    std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new(BIO_s_mem()), BIO_free);
    FUZZ_CHECK(bio && PEM_write_bio_PUBKEY(bio.get(), key.get()) == 1);
    char* pem = nullptr;
    const long size = BIO_get_mem_data(bio.get(), &pem);
    absl::StatusOr<PublicKeyVerifier> parsed =
        PublicKeyVerifier::FromPem(std::string_view(pem, static_cast<size_t>(size)));
    FUZZ_CHECK(parsed.ok());
    verifier = std::make_unique<PublicKeyVerifier>(*std::move(parsed));
  }

  Bytes Sign(std::string_view message) const {
    std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
    size_t size = 0;
    FUZZ_CHECK(ctx &&
               EVP_DigestSignInit(ctx.get(), nullptr, EVP_sha256(), nullptr, key.get()) == 1);
    const auto* text = reinterpret_cast<const unsigned char*>(message.data());
    FUZZ_CHECK(EVP_DigestSign(ctx.get(), nullptr, &size, text, message.size()) == 1);
    Bytes signature(size);
    FUZZ_CHECK(EVP_DigestSign(ctx.get(), signature.data(), &size, text, message.size()) == 1);
    signature.resize(size);
    return signature;
  }
};

const FuzzKey& Key() {
  static const FuzzKey* key = new FuzzKey();
  return *key;
}

void CheckReport(const VerifyReport& report) {
  FUZZ_CHECK(report.last_verified_hash.size() == kHashBytes);
  FUZZ_CHECK(report.records_checked == report.last_verified_seq);
  if (report.ok) {
    FUZZ_CHECK(report.reason.empty() && report.first_bad_seq == 0);
    FUZZ_CHECK(report.signed_through_seq <= report.last_verified_seq);
  } else {
    FUZZ_CHECK(!report.reason.empty());
  }
  FUZZ_CHECK(!report.Summary().empty());
}

}  // namespace
}  // namespace custos::audit

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace custos::audit;
  using custos::Bytes;
  if (size == 0) return 0;
  const uint8_t flags = data[0];
  const std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  const FuzzKey& key = Key();

  std::istringstream checkpoint_stream(text);
  absl::StatusOr<std::vector<Checkpoint>> checkpoints = ReadCheckpointLines(checkpoint_stream);
  if (!checkpoints.ok()) {
    FUZZ_CHECK(checkpoints.status().code() == absl::StatusCode::kInvalidArgument);
    checkpoints = std::vector<Checkpoint>();
  }

  if ((flags & 0x07) == 0) {
    // The export as it is, streamed as custosctl audit verify reads it.
    std::istringstream record_stream(text);
    JsonLinesRecordSource source(&record_stream);
    const Checkpoint* anchor =
        (flags & 0x08) && !checkpoints->empty() ? &checkpoints->back() : nullptr;
    CheckReport(Verify(source, *checkpoints, anchor, *key.verifier));
    return 0;
  }

  // Read every record that parses, up to the first that does not.
  std::vector<Record> records;
  std::istringstream record_stream(text);
  JsonLinesRecordSource source(&record_stream);
  for (absl::StatusOr<std::optional<Record>> next = source.Next(); next.ok() && next->has_value();
       next = source.Next()) {
    records.push_back(**std::move(next));
  }
  if (flags & 0x01) {
    Bytes previous(kHashBytes, 0);
    for (Record& record : records) {
      record.hash = ChainHash(previous, record);
      previous = record.hash;
    }
  }
  if (flags & 0x04) {
    std::map<uint64_t, Bytes> hash_at;
    for (const Record& record : records) hash_at.emplace(record.seq, record.hash);
    const Checkpoint* before = nullptr;
    for (Checkpoint& checkpoint : *checkpoints) {
      if (auto it = hash_at.find(checkpoint.seq); it != hash_at.end()) {
        checkpoint.hash = it->second;
      }
      if (checkpoint.format != 1) {
        checkpoint.prev_seq = before == nullptr ? 0 : before->seq;
        checkpoint.prev_hash = before == nullptr ? Bytes(kHashBytes, 0) : before->hash;
      }
      before = &checkpoint;
    }
  }
  if (flags & 0x02) {
    for (Checkpoint& checkpoint : *checkpoints) {
      checkpoint.signature = key.Sign(CheckpointMessage(checkpoint));
      FUZZ_CHECK(key.verifier->Verify(checkpoint));
    }
  }
  const Checkpoint* anchor =
      (flags & 0x08) && !checkpoints->empty() ? &checkpoints->back() : nullptr;
  VectorRecordSource vector_source(records);
  const VerifyReport report = Verify(vector_source, *checkpoints, anchor, *key.verifier);
  CheckReport(report);
  // Sealed in file order from a log that starts at 1 and runs on without gaps, every record
  // must verify, whatever else the checkpoints say.
  if ((flags & 0x01) && !records.empty()) {
    bool in_order = true;
    for (size_t i = 0; i < records.size(); ++i) {
      in_order = in_order && records[i].seq == i + 1 &&
                 (i == 0 || records[i].format >= records[i - 1].format);
    }
    if (in_order && checkpoints->empty() && anchor == nullptr) {
      FUZZ_CHECK(report.ok && report.records_checked == records.size());
    }
  }
  return 0;
}
