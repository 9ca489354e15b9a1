#include "core/kms.h"

#include <utility>

#include "absl/strings/cord.h"
#include "common/strings.h"
#include "core/call.h"
#include "core/ciphertext_blob.h"
#include "core/key_id.h"
#include "storage/row_codec.h"

namespace custos::core {
namespace {

using policy::Action;
using policy::KeyUse;
using storage::KeyRecord;
using storage::KeyState;

std::string CacheId(const KeyRecord& key, uint32_t version) { return StrCat(key.id, "/", version); }

Action GenerateAction(bool with_plaintext) {
  return with_plaintext ? Action::kGenerateDataKey : Action::kGenerateDataKeyWithoutPlaintext;
}

absl::Status CheckEnabled(const KeyRecord& key) {
  if (key.state == KeyState::kEnabled) return absl::OkStatus();
  return absl::FailedPreconditionError(StrCat(
      "key ", key.id, " is ", storage::KeyStateName(key.state), "; only ENABLED keys can be used"));
}

}  // namespace

Kms::Kms(Options options)
    : options_(std::move(options)),
      policy_(options_.policy),
      root_key_label_(options_.root_key_label),
      usage_(
          options_.store, options_.clock, options_.usage_limits,
          [this](const storage::VersionUsage& reservation) { return Reserve(reservation); },
          options_.wake_maintenance),
      observed_(options_.store, options_.clock),
      context_macs_(options_.context_hmac_cache) {}

std::string Kms::CurrentRoot() const {
  std::lock_guard lock(policy_mu_);
  return root_key_label_;
}

absl::StatusOr<std::string> Kms::RootForNewVersions() {
  {
    std::lock_guard lock(policy_mu_);
    if (root_proven_) return root_key_label_;
  }
  // Outside the lock: the read may walk the log. Absent, the setting must stay absent over the
  // checked log: deleted while custosd was stopped (with the index entries of every record
  // naming it), it would put new versions under a root a rotation retired.
  CUSTOS_ASSIGN_OR_RETURN(const std::optional<std::string> stored,
                          options_.store->GetSetting(kRootKeySetting));
  std::lock_guard lock(policy_mu_);
  if (root_proven_) return root_key_label_;  // a root rotation wrote it meanwhile
  // A present value is checked against the newest record naming it, so a difference is a
  // root rotation whose commit reported failure although it was made: the next start reads it.
  if (stored.value_or(options_.root_key_label) != root_key_label_) {
    absl::Status changed = absl::DataLossError(
        StrCat("the root key in use is '", root_key_label_, "' but the catalogue now names '",
               stored.value_or(options_.root_key_label),
               "' (a root rotation reported failed although it was made, or a change outside "
               "Custos): restart custosd"));
    changed.SetPayload(storage::kIntegrityPayload,
                       absl::Cord(storage::SettingRowName(kRootKeySetting)));
    return changed;
  }
  root_proven_ = true;
  return root_key_label_;
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

absl::StatusOr<KeyRef> Kms::KeyForEncryption(Call& call, std::string_view key_name) const {
  absl::StatusOr<KeyRef> found = FindKey(key_name);
  if (absl::IsNotFound(found.status())) {
    return policy::NoGrant(call.caller().principal, KeyUse::kEncrypt, key_name);
  }
  CUSTOS_ASSIGN_OR_RETURN(KeyRef key, std::move(found));
  call.SetKey(*key, key->primary_version);
  CUSTOS_RETURN_IF_ERROR(
      policy::CheckGrant(key->encrypt_grants, call.caller().principal, KeyUse::kEncrypt, key_name));
  CUSTOS_RETURN_IF_ERROR(CheckEnabled(*key));
  return key;
}

absl::StatusOr<Kms::Sealing> Kms::SealingFor(const KeyRecord& key, const EncryptionContext& context,
                                             UsageTracker::Deferred* reservation) {
  const storage::KeyVersion* version = key.FindVersion(key.primary_version);
  if (version == nullptr) {
    return absl::InternalError(StrCat("key ", key.id, " has no primary version"));
  }
  Sealing sealing;
  sealing.header.key_id = *ParseKeyId(key.id);
  sealing.header.key_version = version->version;
  sealing.aad = BlobAad(sealing.header, context);
  sealing.version = {CacheId(key, version->version), version->wrapped, version->root_key_label};
  CUSTOS_RETURN_IF_ERROR(usage_.CountEncryption(key.id, version->version, reservation));
  return sealing;
}

absl::StatusOr<Ciphertext> Kms::EncryptUnder(const KeyRecord& key,
                                             std::span<const uint8_t> plaintext,
                                             const EncryptionContext& context,
                                             UsageTracker::Deferred* reservation) {
  CUSTOS_ASSIGN_OR_RETURN(const Sealing sealing, SealingFor(key, context, reservation));
  CUSTOS_ASSIGN_OR_RETURN(hsm::GcmCiphertext sealed,
                          options_.hsm->Encrypt(sealing.version, plaintext, sealing.aad));
  return Ciphertext{key.id, sealing.header.key_version,
                    BuildBlob(sealing.header, sealed.iv, sealed.ciphertext_and_tag)};
}

absl::StatusOr<DataKey> Kms::GenerateUnder(const KeyRecord& key, size_t key_bytes,
                                           const EncryptionContext& context,
                                           UsageTracker::Deferred* reservation) {
  CUSTOS_ASSIGN_OR_RETURN(const Sealing sealing, SealingFor(key, context, reservation));
  CUSTOS_ASSIGN_OR_RETURN(hsm::SealedDataKey drawn,
                          options_.hsm->GenerateDataKey(sealing.version, key_bytes, sealing.aad));
  return DataKey{key.id, sealing.header.key_version, std::move(drawn.plaintext),
                 BuildBlob(sealing.header, drawn.sealed.iv, drawn.sealed.ciphertext_and_tag)};
}

absl::StatusOr<Plaintext> Kms::DecryptBlob(Call& call, std::span<const uint8_t> blob,
                                           const EncryptionContext& context) {
  CUSTOS_RETURN_IF_ERROR(ValidateContext(context));
  CUSTOS_ASSIGN_OR_RETURN(ParsedBlob parsed, ParseBlob(blob));
  const std::string key_id = FormatKeyId(parsed.header.key_id);
  absl::StatusOr<KeyRef> key = options_.store->GetKey(key_id);
  if (absl::IsNotFound(key.status())) {
    return policy::NoGrant(call.caller().principal, KeyUse::kDecrypt, key_id);
  }
  if (!key.ok()) return key.status();
  call.SetKey(**key, parsed.header.key_version);
  CUSTOS_RETURN_IF_ERROR(policy::CheckGrant((*key)->decrypt_grants, call.caller().principal,
                                            KeyUse::kDecrypt, key_id));
  CUSTOS_RETURN_IF_ERROR(CheckEnabled(**key));
  // The context's HMAC (an HSM call) only once the caller may decrypt: a refused call costs
  // the HSM nothing, and is recorded without it.
  CUSTOS_RETURN_IF_ERROR(call.BindContext(context));
  return OpenBlob(**key, parsed, context);
}

absl::StatusOr<Plaintext> Kms::OpenBlob(const KeyRecord& key, const ParsedBlob& parsed,
                                        const EncryptionContext& context) {
  const std::string& key_id = key.id;
  const storage::KeyVersion* version = key.FindVersion(parsed.header.key_version);
  if (version == nullptr) {
    return absl::InvalidArgumentError(StrCat("ciphertext blob names version ",
                                             parsed.header.key_version, " of key ", key_id,
                                             ", which does not exist; the blob is corrupted"));
  }
  if (version->version < key.min_decrypt_version) {
    return absl::FailedPreconditionError(
        StrCat("version ", version->version, " of key ", key_id,
               " is retired (the minimum decryption version is ", key.min_decrypt_version,
               "); re-encrypt data with ReEncrypt before retiring, or have officers lower the "
               "minimum with a SetMinDecryptVersion request"));
  }
  const WipedBytes aad = BlobAad(parsed.header, context);
  absl::StatusOr<SecureBytes> plaintext = options_.hsm->Decrypt(
      {CacheId(key, version->version), version->wrapped, version->root_key_label}, parsed.iv,
      parsed.ciphertext_and_tag, aad);
  if (plaintext.status().code() == absl::StatusCode::kInvalidArgument) {
    return absl::InvalidArgumentError(
        "ciphertext failed authentication: the encryption context differs from the one it was "
        "encrypted with, or the blob was modified");
  }
  if (!plaintext.ok()) return plaintext.status();
  usage_.CountDecryption(key_id, version->version);
  return Plaintext{key_id, version->version, *std::move(plaintext)};
}

absl::StatusOr<DataKey> Kms::GenerateDataKey(const Caller& caller, std::string_view key_name,
                                             const EncryptionContext& context, size_t key_bytes,
                                             bool with_plaintext) {
  Call call(*this, caller, GenerateAction(with_plaintext));
  return call.Finish(GenerateDataKeyIn(call, {key_name, context, key_bytes}, with_plaintext));
}

absl::StatusOr<DataKey> Kms::GenerateDataKeyIn(Call& call, const DataKeyItem& item,
                                               bool with_plaintext) {
  CUSTOS_RETURN_IF_ERROR(call.Authorize());
  if (item.key_bytes == 0) {
    return absl::InvalidArgumentError(
        "key_spec is not one this server knows: ask for AES_256 (32 bytes) or AES_128 (16 "
        "bytes)");
  }
  if (item.key_bytes != 16 && item.key_bytes != 32) {
    return absl::InvalidArgumentError("data keys are 16 (AES-128) or 32 (AES-256) bytes");
  }
  CUSTOS_RETURN_IF_ERROR(ValidateContext(item.context));
  CUSTOS_ASSIGN_OR_RETURN(KeyRef key, KeyForEncryption(call, item.key));
  CUSTOS_RETURN_IF_ERROR(call.BindContext(item.context));  // the grant first: see DecryptBlob
  CUSTOS_ASSIGN_OR_RETURN(DataKey generated,
                          GenerateUnder(*key, item.key_bytes, item.context, call.reservation()));
  if (!with_plaintext) generated.plaintext.Wipe();
  return generated;
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
    CUSTOS_ASSIGN_OR_RETURN(KeyRef key, KeyForEncryption(call, key_name));
    CUSTOS_RETURN_IF_ERROR(call.BindContext(context));  // the grant first: see DecryptBlob
    return EncryptUnder(*key, plaintext, context, call.reservation());
  }());
}

absl::StatusOr<Plaintext> Kms::Decrypt(const Caller& caller, std::span<const uint8_t> blob,
                                       const EncryptionContext& context) {
  Call call(*this, caller, Action::kDecrypt);
  return call.Finish(DecryptIn(call, {blob, context}));
}

absl::StatusOr<Plaintext> Kms::DecryptIn(Call& call, const DecryptItem& item) {
  CUSTOS_RETURN_IF_ERROR(call.Authorize());
  return DecryptBlob(call, item.blob, item.context);
}

absl::StatusOr<ReEncrypted> Kms::ReEncrypt(const Caller& caller, std::span<const uint8_t> blob,
                                           const EncryptionContext& source_context,
                                           std::string_view destination_key,
                                           const EncryptionContext& destination_context) {
  Call call(*this, caller, Action::kReEncrypt);
  return call.Finish(
      ReEncryptIn(call, {blob, source_context, destination_key, destination_context}));
}

absl::StatusOr<ReEncrypted> Kms::ReEncryptIn(Call& call, const ReEncryptItem& item) {
  CUSTOS_RETURN_IF_ERROR(call.Authorize());
  CUSTOS_RETURN_IF_ERROR(ValidateContext(item.destination_context));
  // Both grants before any HSM work: the destination's here (the blob's own key if none is
  // named), the source's in DecryptBlob, before it decrypts.
  CUSTOS_ASSIGN_OR_RETURN(const ParsedBlob parsed, ParseBlob(item.blob));
  const std::string source_key_id = FormatKeyId(parsed.header.key_id);
  // The record names the source (as the blob does) and the destination (main key fields),
  // whichever check refuses the call.
  call.event().source_key_id = source_key_id;
  call.event().source_key_version = parsed.header.key_version;
  CUSTOS_ASSIGN_OR_RETURN(KeyRef key, KeyForEncryption(call, item.destination_key.empty()
                                                                 ? std::string_view(source_key_id)
                                                                 : item.destination_key));
  const std::string destination_id = call.event().key_id;
  const uint32_t destination_version = call.event().key_version;
  absl::StatusOr<Plaintext> source = DecryptBlob(call, item.blob, item.source_context);
  call.event().key_id = destination_id;  // DecryptBlob set the source's there
  call.event().key_version = destination_version;
  if (!source.ok()) return source.status();
  // The record binds both contexts: "<source hmac>,<destination hmac>".
  CUSTOS_ASSIGN_OR_RETURN(std::string destination_hmac,
                          ContextHmac(call.caller().principal, item.destination_context));
  call.event().context_hmac += "," + destination_hmac;
  CUSTOS_ASSIGN_OR_RETURN(
      Ciphertext sealed,
      EncryptUnder(*key, source->plaintext.span(), item.destination_context, call.reservation()));
  return ReEncrypted{source->key_id, source->key_version, std::move(sealed)};
}

// Each item runs as a call of its own (authorized, validated, one audit record each, under the
// batch's one call id); the records commit together, once, and only then are the results
// returned: a batch nobody could record answers nothing.
template <typename T, typename Item, typename Run>
absl::StatusOr<std::vector<absl::StatusOr<T>>> Kms::RunBatch(const Caller& caller, Action action,
                                                             std::span<const Item> items, Run run) {
  // The caller's role is checked once for the whole batch, and a refused or malformed batch
  // is one record, not one per item.
  {
    Call whole(*this, caller, action);
    absl::Status allowed = whole.Authorize();
    if (allowed.ok() && (items.empty() || items.size() > kMaxBatchItems)) {
      allowed = absl::InvalidArgumentError(
          StrCat("a batch holds 1 to ", kMaxBatchItems, " items; this one holds ", items.size()));
    }
    if (!allowed.ok()) {
      whole.event().detail = StrCat("batch of ", items.size(), " items");
      return whole.Finish(absl::StatusOr<std::vector<absl::StatusOr<T>>>(allowed));
    }
  }
  const std::string batch_id = NewKeyId();
  std::vector<absl::StatusOr<T>> results;
  std::vector<audit::Event> records;
  results.reserve(items.size());
  records.reserve(items.size());
  for (size_t i = 0; i < items.size(); ++i) {
    Call call(*this, caller, action);
    call.JoinBatch(batch_id);
    call.event().detail = StrCat("batch item ", i + 1, " of ", items.size());
    results.push_back(call.Settle(run(call, items[i]), &records));
  }
  if (absl::Status recorded = Commit({}, records); !recorded.ok()) {
    return absl::UnavailableError(
        StrCat("batch refused, its records could not be written: ", recorded.message()));
  }
  return results;
}

absl::StatusOr<std::vector<absl::StatusOr<DataKey>>> Kms::BatchGenerateDataKey(
    const Caller& caller, std::span<const DataKeyItem> items, bool with_plaintext) {
  return RunBatch<DataKey>(caller, GenerateAction(with_plaintext), items,
                           [&](Call& call, const DataKeyItem& item) {
                             return GenerateDataKeyIn(call, item, with_plaintext);
                           });
}

absl::StatusOr<std::vector<absl::StatusOr<Plaintext>>> Kms::BatchDecrypt(
    const Caller& caller, std::span<const DecryptItem> items) {
  return RunBatch<Plaintext>(
      caller, Action::kDecrypt, items,
      [&](Call& call, const DecryptItem& item) { return DecryptIn(call, item); });
}

absl::StatusOr<std::vector<absl::StatusOr<ReEncrypted>>> Kms::BatchReEncrypt(
    const Caller& caller, std::span<const ReEncryptItem> items) {
  return RunBatch<ReEncrypted>(
      caller, Action::kReEncrypt, items,
      [&](Call& call, const ReEncryptItem& item) { return ReEncryptIn(call, item); });
}

absl::StatusOr<KeyRef> Kms::CreateKey(const Caller& caller, const CreateKeyParams& params) {
  Call call(*this, caller, Action::kCreateKey);
  return call.Finish([&]() -> absl::StatusOr<KeyRef> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    CUSTOS_RETURN_IF_ERROR(ValidateCreate(params));
    OperationParams proposal;
    proposal.create = params;
    if (const int approvals = ApprovalsFor(policy::Operation::kCreateKey, proposal);
        approvals > 0) {
      const bool grants =
          approvals > options_.dual_control.ApprovalsFor(policy::Operation::kCreateKey);
      return absl::FailedPreconditionError(
          grants ? StrCat("creating a key that grants use of it needs ", approvals,
                          " other officer(s) to approve, as UpdateKeyGrants does; propose it "
                          "with Propose(CreateKey), or create it without grants and propose "
                          "UpdateKeyGrants")
                 : StrCat("creating a key needs ", approvals,
                          " other officer(s) to approve under this server's dual-control "
                          "config; propose it with Propose(CreateKey)"));
    }
    // Before the lock: proving the root in use may walk the log (once a run).
    CUSTOS_RETURN_IF_ERROR(RootForNewVersions().status());
    // An alias is locked as Propose(CreateKey) locks it, and is not taken from under a
    // pending request for it (which would then fail at its quorum).
    const std::string target = TargetLockName(policy::Operation::kCreateKey, proposal);
    const ChangeLock lock = LockShared(target);
    CUSTOS_RETURN_IF_ERROR(CheckAliasFree(call, params.alias));
    CUSTOS_RETURN_IF_ERROR(RefusePending(target, observed_.WallBounds().latest));
    CUSTOS_ASSIGN_OR_RETURN(storage::KeyRecord key, NewKey(caller, params));
    call.SetKey(key, key.primary_version);
    auto created = std::make_shared<const storage::KeyRecord>(key);
    call.event().row = storage::KeyRowName(key.id);
    storage::WriteBatch batch;
    batch.keys.push_back(std::move(key));
    CUSTOS_RETURN_IF_ERROR(call.CommitWith(std::move(batch)));
    return created;
  }());
}

absl::StatusOr<Kms::KeyDescription> Kms::DescribeKey(const Caller& caller,
                                                     std::string_view key_name) {
  Call call(*this, caller, Action::kDescribeKey);
  return call.Finish([&]() -> absl::StatusOr<KeyDescription> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    CUSTOS_ASSIGN_OR_RETURN(KeyRef key, FindKey(key_name));
    call.SetKey(*key, 0);
    CUSTOS_ASSIGN_OR_RETURN(std::vector<storage::VersionUsage> usage, usage_.Usage(key->id));
    return KeyDescription{std::move(key), std::move(usage)};
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

absl::Status Kms::GrantsFit(const policy::Policy& policy) const {
  for (const std::string& principal : policy.PrincipalsNotIn(policy::Role::kApp)) {
    CUSTOS_ASSIGN_OR_RETURN(const std::optional<std::string> key_id,
                            options_.store->KeyGranting(principal));
    if (key_id.has_value()) {
      return absl::FailedPreconditionError(
          StrCat("principal '", principal, "' would hold role '",
                 policy::RoleName(*policy.RoleOf(principal)), "' but key ", *key_id,
                 " grants it use of key material; revoke the grant first"));
    }
  }
  return absl::OkStatus();
}

absl::Status Kms::ReplacePolicy(std::shared_ptr<const policy::Policy> policy) {
  CUSTOS_RETURN_IF_ERROR(policy::CheckQuorumsReachable(options_.dual_control, *policy));
  // Held throughout, so no key change validated against the old policy slips in meanwhile.
  std::lock_guard requests_lock(requests_mu_);
  CUSTOS_RETURN_IF_ERROR(GrantsFit(*policy));
  // Recorded first: a policy nobody could record never takes effect (the old one stays).
  const std::string detail = StrCat("policy sha256=", policy->sha256_hex());
  CUSTOS_RETURN_IF_ERROR(
      Commit({}, {ServerEvent("LoadPolicy", "", "", absl::StatusCode::kOk, detail)}));
  std::lock_guard lock(policy_mu_);
  policy_ = std::move(policy);
  return absl::OkStatus();
}

}  // namespace custos::core
