#include "core/kms.h"

#include <utility>

#include "common/strings.h"
#include "core/ciphertext_blob.h"
#include "core/key_id.h"

namespace custos::core {
namespace {

using policy::Action;
using policy::KeyUse;
using storage::KeyRecord;
using storage::KeyState;

constexpr size_t kMaxAliasBytes = 128;
constexpr size_t kMaxDescriptionBytes = 1024;
constexpr size_t kMaxTags = 50;
constexpr size_t kMaxTagKeyBytes = 128;
constexpr size_t kMaxTagValueBytes = 256;

std::string CacheId(const KeyRecord& key, uint32_t version) { return StrCat(key.id, "/", version); }

absl::Status CheckEnabled(const KeyRecord& key) {
  if (key.state == KeyState::kEnabled) return absl::OkStatus();
  return absl::FailedPreconditionError(StrCat(
      "key ", key.id, " is ", storage::KeyStateName(key.state), "; only ENABLED keys can be used"));
}

absl::Status ValidateAlias(std::string_view alias) {
  if (alias.empty()) return absl::OkStatus();
  if (alias.size() > kMaxAliasBytes) {
    return absl::InvalidArgumentError(
        StrCat("alias is ", alias.size(), " bytes; at most ", kMaxAliasBytes, " allowed"));
  }
  for (char c : alias) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_' || c == '/' || c == '.';
    if (!ok) {
      return absl::InvalidArgumentError(
          "alias may contain only letters, digits, '-', '_', '/' and '.'");
    }
  }
  if (ParseKeyId(alias)) {
    return absl::InvalidArgumentError("alias must not look like a key id (UUID)");
  }
  return absl::OkStatus();
}

absl::Status ValidateTags(const std::map<std::string, std::string>& tags) {
  if (tags.size() > kMaxTags) {
    return absl::InvalidArgumentError(StrCat("at most ", kMaxTags, " tags allowed"));
  }
  for (const auto& [name, value] : tags) {
    if (name.empty() || name.size() > kMaxTagKeyBytes || value.size() > kMaxTagValueBytes) {
      return absl::InvalidArgumentError(StrCat("tag names must be 1..", kMaxTagKeyBytes,
                                               " bytes and values at most ", kMaxTagValueBytes,
                                               " bytes"));
    }
  }
  return absl::OkStatus();
}

// Grants may name only apps: an officer or auditor with a grant would break separation of
// duties, and a principal missing from the policy is most likely a typo.
absl::Status ValidateGrantees(const policy::Policy& policy, const std::set<std::string>& grantees,
                              std::string_view field) {
  for (const std::string& principal : grantees) {
    if (policy.RoleOf(principal) != policy::Role::kApp) {
      return absl::InvalidArgumentError(StrCat("principal '", principal, "' in ", field,
                                               " is not an app in the policy; only apps "
                                               "may be granted use of a key"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

// One use-case invocation: authorizes the caller and records the audit event on Finish.
class Kms::Call {
 public:
  Call(const Kms& kms, const Caller& caller, Action action) : kms_(kms), caller_(caller) {
    event_.time = kms.options_.clock->NowSeconds();
    event_.principal = caller.principal;
    event_.peer = caller.peer;
    event_.action = std::string(policy::ActionName(action));
    action_ = action;
  }

  // Resolves the caller's role from the current policy and checks it may perform the action.
  absl::Status Authorize() {
    const std::shared_ptr<const policy::Policy> policy = kms_.CurrentPolicy();
    const std::optional<policy::Role> role = policy->RoleOf(caller_.principal);
    if (!role) {
      return absl::PermissionDeniedError(
          StrCat("principal '", caller_.principal,
                 "' holds no role in the policy; an administrator must add it to the policy file"));
    }
    event_.role = std::string(policy::RoleName(*role));
    return policy::AuthorizeRole(*role, action_);
  }

  void SetKey(const KeyRecord& key, uint32_t version) {
    event_.key_id = key.id;
    event_.key_version = version;
  }
  audit::Event& event() { return event_; }
  const Caller& caller() const { return caller_; }

  // Records the outcome; a result nobody could record is not returned (fail closed).
  template <typename T>
  absl::StatusOr<T> Finish(absl::StatusOr<T> result) {
    event_.outcome = result.status().code();
    absl::Status recorded = kms_.options_.audit->Append(event_);
    if (!recorded.ok()) {
      return absl::UnavailableError(
          StrCat("audit log unavailable, operation refused: ", recorded.message()));
    }
    return result;
  }

 private:
  const Kms& kms_;
  const Caller& caller_;
  Action action_;
  audit::Event event_;
};

Kms::Kms(Options options) : options_(std::move(options)), policy_(options_.policy) {}

void Kms::SetPolicy(std::shared_ptr<const policy::Policy> policy) {
  std::lock_guard lock(policy_mu_);
  policy_ = std::move(policy);
}

std::shared_ptr<const policy::Policy> Kms::CurrentPolicy() const {
  std::lock_guard lock(policy_mu_);
  return policy_;
}

absl::StatusOr<KeyRef> Kms::FindKey(std::string_view key) const {
  if (key.empty()) return absl::InvalidArgumentError("no key given: name a key id or alias");
  if (ParseKeyId(key)) return options_.store->GetKey(AsciiLower(key));
  return options_.store->FindKeyByAlias(key);
}

absl::StatusOr<Ciphertext> Kms::EncryptUnder(const KeyRecord& key,
                                             std::span<const uint8_t> plaintext,
                                             const EncryptionContext& context) {
  const storage::KeyVersion* version = key.FindVersion(key.primary_version);
  if (version == nullptr) {
    return absl::InternalError(StrCat("key ", key.id, " has no primary version"));
  }
  BlobHeader header;
  header.key_id = *ParseKeyId(key.id);
  header.key_version = version->version;
  const Bytes aad = BlobAad(header, context);
  CUSTOS_ASSIGN_OR_RETURN(
      hsm::GcmCiphertext sealed,
      options_.hsm->Encrypt({CacheId(key, version->version), version->wrapped}, plaintext, aad));
  return Ciphertext{key.id, version->version,
                    BuildBlob(header, sealed.iv, sealed.ciphertext_and_tag)};
}

absl::StatusOr<Plaintext> Kms::DecryptBlob(Call& call, std::span<const uint8_t> blob,
                                           const EncryptionContext& context) {
  CUSTOS_RETURN_IF_ERROR(ValidateContext(context));
  CUSTOS_ASSIGN_OR_RETURN(ParsedBlob parsed, ParseBlob(blob));
  const std::string key_id = FormatKeyId(parsed.header.key_id);
  absl::StatusOr<KeyRef> key = options_.store->GetKey(key_id);
  if (key.status().code() == absl::StatusCode::kNotFound) {
    return absl::InvalidArgumentError(
        "ciphertext blob names a key this server does not hold; it is corrupted or was made by "
        "another Custos deployment");
  }
  if (!key.ok()) return key.status();
  call.SetKey(**key, parsed.header.key_version);
  CUSTOS_RETURN_IF_ERROR(policy::CheckGrant((*key)->decrypt_grants, call.caller().principal,
                                            KeyUse::kDecrypt, key_id));
  CUSTOS_RETURN_IF_ERROR(CheckEnabled(**key));
  const storage::KeyVersion* version = (*key)->FindVersion(parsed.header.key_version);
  if (version == nullptr) {
    return absl::InvalidArgumentError(StrCat("ciphertext blob names version ",
                                             parsed.header.key_version, " of key ", key_id,
                                             ", which does not exist; the blob is corrupted"));
  }
  const Bytes aad = BlobAad(parsed.header, context);
  absl::StatusOr<SecureBytes> plaintext =
      options_.hsm->Decrypt({CacheId(**key, version->version), version->wrapped}, parsed.iv,
                            parsed.ciphertext_and_tag, aad);
  if (plaintext.status().code() == absl::StatusCode::kInvalidArgument) {
    return absl::InvalidArgumentError(
        "ciphertext failed authentication: the encryption context differs from the one it was "
        "encrypted with, or the blob was modified");
  }
  if (!plaintext.ok()) return plaintext.status();
  return Plaintext{key_id, version->version, *std::move(plaintext)};
}

absl::StatusOr<DataKey> Kms::GenerateDataKey(const Caller& caller, std::string_view key_name,
                                             const EncryptionContext& context, size_t key_bytes,
                                             bool with_plaintext) {
  Call call(*this, caller,
            with_plaintext ? Action::kGenerateDataKey : Action::kGenerateDataKeyWithoutPlaintext);
  return call.Finish([&]() -> absl::StatusOr<DataKey> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    if (key_bytes != 16 && key_bytes != 32) {
      return absl::InvalidArgumentError("data keys are 16 (AES-128) or 32 (AES-256) bytes");
    }
    CUSTOS_RETURN_IF_ERROR(ValidateContext(context));
    CUSTOS_ASSIGN_OR_RETURN(KeyRef key, FindKey(key_name));
    call.SetKey(*key, key->primary_version);
    CUSTOS_RETURN_IF_ERROR(
        policy::CheckGrant(key->encrypt_grants, caller.principal, KeyUse::kEncrypt, key->id));
    CUSTOS_RETURN_IF_ERROR(CheckEnabled(*key));
    CUSTOS_ASSIGN_OR_RETURN(SecureBytes plaintext, options_.hsm->GenerateRandom(key_bytes));
    CUSTOS_ASSIGN_OR_RETURN(Ciphertext sealed, EncryptUnder(*key, plaintext.span(), context));
    if (!with_plaintext) plaintext.Wipe();
    return DataKey{sealed.key_id, sealed.key_version, std::move(plaintext),
                   std::move(sealed.ciphertext_blob)};
  }());
}

absl::StatusOr<Ciphertext> Kms::Encrypt(const Caller& caller, std::string_view key_name,
                                        std::span<const uint8_t> plaintext,
                                        const EncryptionContext& context) {
  Call call(*this, caller, Action::kEncrypt);
  return call.Finish([&]() -> absl::StatusOr<Ciphertext> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    if (plaintext.empty()) return absl::InvalidArgumentError("plaintext is empty");
    if (plaintext.size() > kMaxEncryptPlaintextBytes) {
      return absl::InvalidArgumentError(
          StrCat("plaintext is ", plaintext.size(), " bytes; Encrypt takes at most ",
                 kMaxEncryptPlaintextBytes, " (use GenerateDataKey for larger data)"));
    }
    CUSTOS_RETURN_IF_ERROR(ValidateContext(context));
    CUSTOS_ASSIGN_OR_RETURN(KeyRef key, FindKey(key_name));
    call.SetKey(*key, key->primary_version);
    CUSTOS_RETURN_IF_ERROR(
        policy::CheckGrant(key->encrypt_grants, caller.principal, KeyUse::kEncrypt, key->id));
    CUSTOS_RETURN_IF_ERROR(CheckEnabled(*key));
    return EncryptUnder(*key, plaintext, context);
  }());
}

absl::StatusOr<Plaintext> Kms::Decrypt(const Caller& caller, std::span<const uint8_t> blob,
                                       const EncryptionContext& context) {
  Call call(*this, caller, Action::kDecrypt);
  return call.Finish([&]() -> absl::StatusOr<Plaintext> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    return DecryptBlob(call, blob, context);
  }());
}

absl::StatusOr<ReEncrypted> Kms::ReEncrypt(const Caller& caller, std::span<const uint8_t> blob,
                                           const EncryptionContext& source_context,
                                           std::string_view destination_key,
                                           const EncryptionContext& destination_context) {
  Call call(*this, caller, Action::kReEncrypt);
  return call.Finish([&]() -> absl::StatusOr<ReEncrypted> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    CUSTOS_RETURN_IF_ERROR(ValidateContext(destination_context));
    CUSTOS_ASSIGN_OR_RETURN(Plaintext source, DecryptBlob(call, blob, source_context));
    // DecryptBlob recorded the source key; the destination takes the main key fields.
    call.event().source_key_id = std::exchange(call.event().key_id, "");
    call.event().source_key_version = std::exchange(call.event().key_version, 0);
    CUSTOS_ASSIGN_OR_RETURN(
        KeyRef key,
        FindKey(destination_key.empty() ? std::string_view(source.key_id) : destination_key));
    call.SetKey(*key, key->primary_version);
    CUSTOS_RETURN_IF_ERROR(
        policy::CheckGrant(key->encrypt_grants, caller.principal, KeyUse::kEncrypt, key->id));
    CUSTOS_RETURN_IF_ERROR(CheckEnabled(*key));
    CUSTOS_ASSIGN_OR_RETURN(Ciphertext sealed,
                            EncryptUnder(*key, source.plaintext.span(), destination_context));
    return ReEncrypted{source.key_id, source.key_version, std::move(sealed)};
  }());
}

absl::StatusOr<KeyRef> Kms::CreateKey(const Caller& caller, const CreateKeyParams& params) {
  Call call(*this, caller, Action::kCreateKey);
  return call.Finish([&]() -> absl::StatusOr<KeyRef> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    CUSTOS_RETURN_IF_ERROR(ValidateAlias(params.alias));
    if (params.description.size() > kMaxDescriptionBytes) {
      return absl::InvalidArgumentError(
          StrCat("description is longer than ", kMaxDescriptionBytes, " bytes"));
    }
    CUSTOS_RETURN_IF_ERROR(ValidateTags(params.tags));
    const std::shared_ptr<const policy::Policy> policy = CurrentPolicy();
    CUSTOS_RETURN_IF_ERROR(
        ValidateGrantees(*policy, params.encrypt_principals, "encrypt_principals"));
    CUSTOS_RETURN_IF_ERROR(
        ValidateGrantees(*policy, params.decrypt_principals, "decrypt_principals"));
    CUSTOS_ASSIGN_OR_RETURN(KeyRef key, Execute(caller, params));
    call.SetKey(*key, key->primary_version);
    return key;
  }());
}

absl::StatusOr<KeyRef> Kms::Execute(const Caller& caller, const CreateKeyParams& params) {
  KeyRecord key;
  key.id = NewKeyId();
  key.alias = params.alias;
  key.description = params.description;
  key.tags = params.tags;
  key.state = KeyState::kEnabled;
  key.created_at = options_.clock->NowSeconds();
  key.created_by = caller.principal;
  key.primary_version = 1;
  key.encrypt_grants = params.encrypt_principals;
  key.decrypt_grants = params.decrypt_principals;
  // The version is generated in the HSM and only its wrapped form comes out: creating a key
  // adds a row, never a token object.
  CUSTOS_ASSIGN_OR_RETURN(Bytes wrapped, options_.hsm->GenerateWrappedKey());
  key.versions.push_back({1, std::move(wrapped), options_.hsm->RootKeyLabel(), key.created_at});
  CUSTOS_RETURN_IF_ERROR(options_.store->CreateKey(key));
  return options_.store->GetKey(key.id);
}

absl::StatusOr<KeyRef> Kms::DescribeKey(const Caller& caller, std::string_view key_name) {
  Call call(*this, caller, Action::kDescribeKey);
  return call.Finish([&]() -> absl::StatusOr<KeyRef> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    CUSTOS_ASSIGN_OR_RETURN(KeyRef key, FindKey(key_name));
    call.SetKey(*key, 0);
    return key;
  }());
}

absl::StatusOr<storage::KeyPage> Kms::ListKeys(const Caller& caller, size_t page_size,
                                               std::string_view page_token) {
  Call call(*this, caller, Action::kListKeys);
  return call.Finish([&]() -> absl::StatusOr<storage::KeyPage> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    return options_.store->ListKeys(page_size, page_token);
  }());
}

}  // namespace custos::core
