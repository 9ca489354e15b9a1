// RowIntegrity: seals catalogue rows as they are written and checks them as they are read
// back (see row_codec.h for what a row is and why).
//
// A row read from the file is served only if (1) its MAC verifies under the authenticator's
// key (so nobody without that key wrote it), (2) the newest audit record naming the row
// carries the digest of exactly this content (so it is the current version, not an older one
// put back) and (3) that record, and every one after it, is as it was written (AuditTrust: so
// nobody hid a newer record naming the row). A row that fails is remembered and refused from then
// on, without asking the HSM again, with DATA_LOSS carrying the payload kIntegrityPayload (the
// row's name), so the use case can raise the alarm once. Without an authenticator (tests, offline
// tools) nothing is sealed or checked. Internal to storage/. Thread-safe.
#pragma once

#include <openssl/evp.h>

#include <array>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>

#include "common/secure_bytes.h"
#include "common/status.h"
#include "storage/audit_trust.h"
#include "storage/key_store.h"

namespace custos::storage {

// The newest audit record naming a row: its seq and the row digest it carries.
struct RowRecord {
  uint64_t seq = 0;
  std::string digest;
};

class RowIntegrity {
 public:
  // What a row must satisfy besides its MAC.
  enum class Chain {
    kRecorded,        // the newest record naming it carries its digest
    kRecordedIfUsed,  // the same, but a row no record names is fine (a usage row never reserved)
    kMacOnly,         // replay-safe: an older sealed value may be served again
  };

  // `trust` must outlive this object.
  RowIntegrity(RowAuthenticator* authenticator, AuditTrust* trust);

  bool enabled() const { return authenticator_ != nullptr; }

  // A catalogue from before rows carried MACs, not sealed yet (KeyStore::SealCatalog): a row
  // without a MAC is served as it is, until the catalogue is sealed. Rows with a MAC are
  // checked all the same.
  void set_unsealed_catalog(bool unsealed) { unsealed_catalog_ = unsealed; }

  // The MAC to store with `canonical`; empty without an authenticator. UNAVAILABLE if the
  // authenticator cannot be reached.
  absl::StatusOr<Bytes> Seal(std::span<const uint8_t> canonical) const;

  // OK if the row named `name` with this content and stored `mac`, vouched for by `recorded`
  // (the newest audit record naming it, nullopt if none does), may be served. Otherwise
  // DATA_LOSS saying what is wrong, with kIntegrityPayload, also on every later call for the
  // same row. UNAVAILABLE (nothing remembered) if the authenticator or the log cannot be read.
  // With `mac_verified` (this very content and MAC passed the MAC check before) the MAC is not
  // computed again; everything else is checked all the same.
  absl::Status Check(const std::string& name, std::span<const uint8_t> canonical,
                     std::span<const uint8_t> mac, const std::optional<RowRecord>& recorded,
                     Chain chain, bool mac_verified = false);

  // Refuses row `name` from now on (as Check does), saying `why`.
  absl::Status Refuse(const std::string& name, std::string_view why);

  // The newest record naming row `name` that this process wrote (noted once committed) or
  // believed (Check notes it), kept for the run: the file is held to it from then on, since
  // a record edited in place while custosd runs is not recomputed a second time. The store
  // also notes every record it verifies (at start-up after the HSM's head, and as the walks
  // below the trusted point go), so every row the live log names is noted once the log is
  // walked. An older record than the one noted is ignored. Memory: 59 bytes per row (measured).
  void Noted(const std::string& name, const RowRecord& record);
  // OK if `recorded` (the newest record naming `name` as the file says now; nullopt if none)
  // is the one noted for it, or none is noted and `recorded` is at or before the trusted
  // point (records after it were all noted as verified or written); otherwise refuses the row
  // (as Check does). Call it under the lock the read of `recorded` was made under, which
  // commits and verifications note under too, so that none comes in between.
  absl::Status Agrees(const std::string& name, const std::optional<RowRecord>& recorded);

  // The refusal remembered for `name`, or OK.
  absl::Status Known(const std::string& name) const;

 private:
  RowAuthenticator* const authenticator_;
  AuditTrust* const trust_;
  std::atomic<bool> unsealed_catalog_{false};
  mutable std::mutex mu_;
  std::map<std::string, absl::Status> refused_;  // guarded by mu_
  // Noted records, by a 64-bit hash of the row's name keyed with a secret of this process
  // (HeadKey): a TDE mount's name is a caller's, and a name crafted to share another row's
  // hash would have that row refused.
  struct Head {
    uint64_t seq = 0;
    std::array<char, 16> digest{};  // the first 64 bits of the row's digest, in hex
  };
  static Head HeadOf(const RowRecord& record);
  uint64_t HeadKey(const std::string& name) const;
  struct FreeDigest {
    void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
  };
  // SHA-256 after a random block; copied, never changed (so read by many threads at once).
  const std::unique_ptr<EVP_MD_CTX, FreeDigest> head_key_;
  std::mutex heads_mu_;
  std::unordered_map<uint64_t, Head> heads_;  // guarded by heads_mu_
};

}  // namespace custos::storage
