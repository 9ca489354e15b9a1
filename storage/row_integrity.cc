#include "storage/row_integrity.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "absl/strings/cord.h"
#include "common/strings.h"
#include "storage/row_codec.h"

namespace custos::storage {

RowIntegrity::RowIntegrity(RowAuthenticator* authenticator, AuditTrust* trust)
    : authenticator_(authenticator), trust_(trust), head_key_(EVP_MD_CTX_new()) {
  // One SHA-256 block of secret, absorbed once: each name is hashed from a copy of that state.
  std::array<uint8_t, 64> secret;
  // A failing CSPRNG is not something to serve through.
  if (RAND_bytes(secret.data(), static_cast<int>(secret.size())) != 1) std::abort();
  const bool ok = head_key_ != nullptr &&
                  EVP_DigestInit_ex(head_key_.get(), EVP_sha256(), nullptr) == 1 &&
                  EVP_DigestUpdate(head_key_.get(), secret.data(), secret.size()) == 1;
  OPENSSL_cleanse(secret.data(), secret.size());
  if (!ok) std::abort();  // out of memory inside OpenSSL
}

uint64_t RowIntegrity::HeadKey(const std::string& name) const {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  const bool ok = ctx != nullptr && EVP_MD_CTX_copy_ex(ctx, head_key_.get()) == 1 &&
                  EVP_DigestUpdate(ctx, name.data(), name.size()) == 1 &&
                  EVP_DigestFinal_ex(ctx, digest, &length) == 1;
  EVP_MD_CTX_free(ctx);
  if (!ok) std::abort();  // out of memory inside OpenSSL
  uint64_t key;
  std::memcpy(&key, digest, sizeof key);
  return key;
}

absl::StatusOr<Bytes> RowIntegrity::Seal(std::span<const uint8_t> canonical) const {
  if (authenticator_ == nullptr) return Bytes();
  absl::StatusOr<Bytes> mac = authenticator_->Mac(canonical);
  if (mac.ok()) return mac;
  // Whatever the HSM said, nothing was written and a retry may succeed.
  absl::Status failed(absl::StatusCode::kUnavailable,
                      StrCat("a row could not be sealed: ", mac.status().message()));
  mac.status().ForEachPayload(
      [&](absl::string_view url, const absl::Cord& payload) { failed.SetPayload(url, payload); });
  failed.SetPayload(kSealPayload, absl::Cord());
  return failed;
}

absl::Status RowIntegrity::Known(const std::string& name) const {
  std::lock_guard lock(mu_);
  auto it = refused_.find(name);
  return it == refused_.end() ? absl::OkStatus() : it->second;
}

absl::Status RowIntegrity::Check(const std::string& name, std::span<const uint8_t> canonical,
                                 std::span<const uint8_t> mac,
                                 const std::optional<RowRecord>& recorded, Chain chain,
                                 bool mac_verified) {
  if (authenticator_ == nullptr) return absl::OkStatus();
  CUSTOS_RETURN_IF_ERROR(Known(name));
  if (chain == Chain::kRecordedIfUsed && !recorded.has_value() && mac.empty()) {
    return absl::OkStatus();  // the caller checked there is nothing to guard in it
  }
  if (mac.empty() && unsealed_catalog_) return absl::OkStatus();  // sealed at start-up
  if (mac.empty()) return Refuse(name, "it carries no MAC (written outside Custos?)");
  if (!mac_verified) {
    CUSTOS_ASSIGN_OR_RETURN(const Bytes expected, authenticator_->Mac(canonical));
    if (expected.size() != mac.size() ||
        CRYPTO_memcmp(expected.data(), mac.data(), mac.size()) != 0) {
      return Refuse(name, "its MAC does not match its content (changed outside Custos)");
    }
  }
  if (chain == Chain::kMacOnly) return absl::OkStatus();
  if (!recorded.has_value()) {
    return Refuse(name, "no audit record names it (written outside Custos?)");
  }
  if (recorded->digest != RowDigest(canonical)) {
    return Refuse(name,
                  "it is not the version the audit log last recorded (an older copy put back?)");
  }
  absl::Status covered = trust_->Cover(recorded->seq);
  if (absl::IsFailedPrecondition(covered)) {
    return Refuse(name, StrCat("the audit record that vouches for it (", recorded->seq,
                               ") is in a part of the log changed after it was written: ",
                               covered.message()));
  }
  if (covered.ok()) Noted(name, *recorded);
  return covered;
}

RowIntegrity::Head RowIntegrity::HeadOf(const RowRecord& record) {
  Head head;
  head.seq = record.seq;
  std::copy_n(record.digest.begin(), std::min(record.digest.size(), head.digest.size()),
              head.digest.begin());
  return head;
}

void RowIntegrity::Noted(const std::string& name, const RowRecord& record) {
  if (authenticator_ == nullptr) return;
  const Head head = HeadOf(record);
  const uint64_t key = HeadKey(name);
  std::lock_guard lock(heads_mu_);
  auto [it, inserted] = heads_.try_emplace(key, head);
  if (!inserted && it->second.seq < head.seq) it->second = head;
}

absl::Status RowIntegrity::Agrees(const std::string& name,
                                  const std::optional<RowRecord>& recorded) {
  if (authenticator_ == nullptr) return absl::OkStatus();
  Head noted;
  const uint64_t key = HeadKey(name);
  {
    std::lock_guard lock(heads_mu_);
    auto it = heads_.find(key);
    if (it != heads_.end()) noted = it->second;
  }
  if (noted.seq == 0) {
    // Every record after the trusted point was verified or written by this process, which
    // noted the rows they named: one that names a row never noted was renamed since.
    // (One past the last record committed was added from outside: Cover says so.)
    if (!recorded || !trust_->anchored() || recorded->seq <= trust_->trusted_seq() ||
        recorded->seq > trust_->committed_seq()) {
      return absl::OkStatus();
    }
    return Refuse(name, StrCat("audit record ", recorded->seq,
                               " names it now, but did not when custosd verified or wrote it "
                               "(the log was edited while custosd ran)"));
  }
  if (recorded.has_value()) {
    const Head found = HeadOf(*recorded);
    if (found.seq == noted.seq && found.digest == noted.digest) return absl::OkStatus();
  }
  return Refuse(name, StrCat("custosd wrote or checked audit record ", noted.seq,
                             " as the newest naming it in this run, but the log now says ",
                             recorded ? StrCat("record ", recorded->seq, " with digest ",
                                               recorded->digest.substr(0, 16), "...")
                                      : std::string("no record names it"),
                             " (the log or its row index was edited while custosd ran)"));
}

absl::Status RowIntegrity::Refuse(const std::string& name, std::string_view why) {
  absl::Status refusal = absl::DataLossError(
      StrCat("catalogue row ", name, " failed its integrity check: ", why,
             "; it is not used until an operator restores it from a backup of this state"));
  refusal.SetPayload(kIntegrityPayload, absl::Cord(name));
  std::lock_guard lock(mu_);
  refused_.emplace(name, refusal);
  return refusal;
}

}  // namespace custos::storage
