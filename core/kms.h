// Kms: Custos's use cases, independent of any transport.
//
// Every call takes the authenticated Caller and runs the same steps: resolve the caller's role
// from the current policy, check that the role may perform the action (separation of duties),
// do the work (key lookup, grant check, one or two HSM calls), then append an audit event
// whatever the outcome. If the audit sink refuses the event, a successful result is discarded
// and UNAVAILABLE returned: nothing is answered that was not recorded.
//
// Errors: NOT_FOUND unknown key; PERMISSION_DENIED wrong role, unknown principal or no grant;
// INVALID_ARGUMENT malformed input or a ciphertext that does not authenticate;
// FAILED_PRECONDITION key not enabled; UNAVAILABLE HSM, store or audit log down;
// ALREADY_EXISTS alias taken. Messages say what to fix and never carry secrets.
//
// Thread-safe; the HSM, store, sink and clock it is given must outlive it.
#pragma once

#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <string>
#include <string_view>

#include "audit/event.h"
#include "common/clock.h"
#include "common/secure_bytes.h"
#include "common/status.h"
#include "core/encryption_context.h"
#include "hsm/hsm.h"
#include "policy/authorizer.h"
#include "policy/policy.h"
#include "storage/key_store.h"

namespace custos::core {

// Who is asking, as established by the transport (e.g. from a verified client certificate).
struct Caller {
  std::string principal;
  std::string peer;  // transport address, for the audit log
};

inline constexpr size_t kMaxEncryptPlaintextBytes = 4096;

struct DataKey {
  std::string key_id;
  uint32_t key_version = 0;
  SecureBytes plaintext;  // empty for GenerateDataKeyWithoutPlaintext
  Bytes ciphertext_blob;
};

struct Ciphertext {
  std::string key_id;
  uint32_t key_version = 0;
  Bytes ciphertext_blob;
};

struct Plaintext {
  std::string key_id;
  uint32_t key_version = 0;
  SecureBytes plaintext;
};

struct ReEncrypted {
  std::string source_key_id;
  uint32_t source_key_version = 0;
  Ciphertext destination;
};

struct CreateKeyParams {
  std::string alias;
  std::string description;
  std::map<std::string, std::string> tags;
  std::set<std::string> encrypt_principals;
  std::set<std::string> decrypt_principals;
};

using KeyRef = std::shared_ptr<const storage::KeyRecord>;

class Kms {
 public:
  struct Options {
    hsm::Hsm* hsm = nullptr;
    storage::KeyStore* store = nullptr;
    audit::Sink* audit = nullptr;
    const Clock* clock = nullptr;
    std::shared_ptr<const policy::Policy> policy;
  };
  explicit Kms(Options options);

  // Replaces the policy for every later call (e.g. on SIGHUP).
  void SetPolicy(std::shared_ptr<const policy::Policy> policy);

  // --- Applications -------------------------------------------------------------------------
  // A fresh data key of `key_bytes` (16 or 32) from the HSM's RNG, encrypted under `key`'s
  // primary version. With `with_plaintext` false the plaintext is wiped before returning.
  absl::StatusOr<DataKey> GenerateDataKey(const Caller& caller, std::string_view key,
                                          const EncryptionContext& context, size_t key_bytes,
                                          bool with_plaintext);
  // Encrypts 1..4096 bytes under `key`'s primary version.
  absl::StatusOr<Ciphertext> Encrypt(const Caller& caller, std::string_view key,
                                     std::span<const uint8_t> plaintext,
                                     const EncryptionContext& context);
  absl::StatusOr<Plaintext> Decrypt(const Caller& caller, std::span<const uint8_t> blob,
                                    const EncryptionContext& context);
  // Decrypts `blob` and encrypts its plaintext under the primary version of
  // `destination_key` (the blob's own key if empty). Needs a decrypt grant on the source and
  // an encrypt grant on the destination. The plaintext never leaves this call.
  absl::StatusOr<ReEncrypted> ReEncrypt(const Caller& caller, std::span<const uint8_t> blob,
                                        const EncryptionContext& source_context,
                                        std::string_view destination_key,
                                        const EncryptionContext& destination_context);

  // --- Officers -----------------------------------------------------------------------------
  absl::StatusOr<KeyRef> CreateKey(const Caller& caller, const CreateKeyParams& params);
  absl::StatusOr<KeyRef> DescribeKey(const Caller& caller, std::string_view key);
  absl::StatusOr<storage::KeyPage> ListKeys(const Caller& caller, size_t page_size,
                                            std::string_view page_token);

 private:
  class Call;

  std::shared_ptr<const policy::Policy> CurrentPolicy() const;
  absl::StatusOr<KeyRef> FindKey(std::string_view key) const;
  absl::StatusOr<Ciphertext> EncryptUnder(const storage::KeyRecord& key,
                                          std::span<const uint8_t> plaintext,
                                          const EncryptionContext& context);
  absl::StatusOr<Plaintext> DecryptBlob(Call& call, std::span<const uint8_t> blob,
                                        const EncryptionContext& context);
  // The one place that changes key state. Dual control will gate what reaches it.
  absl::StatusOr<KeyRef> Execute(const Caller& caller, const CreateKeyParams& params);

  Options options_;
  mutable std::mutex policy_mu_;
  std::shared_ptr<const policy::Policy> policy_;
};

}  // namespace custos::core
