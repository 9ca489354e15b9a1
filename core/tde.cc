// The key/value gateway's use cases (docs/TDE.md): table-space keys of databases and the
// tokens databases fetch them with. Both are catalogue settings rows ("tde/<mount>/<key id>",
// "db-token/<token id>"), so each is sealed with the catalogue's HSM key and chained to the
// audit record that wrote it, like every row: a database edited by hand, or an older copy of a
// row put back (a revoked token made valid again), fails its check and serves nothing.
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/escaping.h"
#include "common/strings.h"
#include "core/call.h"
#include "core/key_id.h"
#include "core/kms.h"
#include "storage/row_codec.h"

namespace custos::core {
namespace {

using Json = nlohmann::json;
using policy::Action;
using policy::Operation;
using storage::KeyState;
using storage::RequestState;

constexpr char kTokenPrefix[] = "cdt.";
constexpr size_t kMaxMountBytes = 64;
constexpr size_t kMaxTokenKeyIds = 1024;
constexpr int64_t kMaxTokenTtlDays = 366;
constexpr size_t kTdeKeyBytes = 32;  // AES-256
constexpr size_t kTokenSecretBytes = 32;

std::string TdeSetting(std::string_view mount, uint32_t key_id) {
  return StrCat("tde/", mount, "/", key_id);
}

std::string TokenSetting(std::string_view token_id) { return StrCat("db-token/", token_id); }

absl::Status CheckMount(std::string_view mount) {
  const auto alnum = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
  };
  // A leading letter or digit: "." and ".." would be dot segments, which HTTP clients (the
  // plugin's curl) drop from the URL, so no request could reach them. "sys" is the Vault API's
  // own (/v1/sys/...), which the gateway speaks.
  const bool valid = !mount.empty() && mount.size() <= kMaxMountBytes && alnum(mount[0]) &&
                     mount != "sys" && std::all_of(mount.begin(), mount.end(), [&](char c) {
                       return alnum(c) || c == '_' || c == '.' || c == '-';
                     });
  if (valid) return absl::OkStatus();
  return absl::InvalidArgumentError(
      StrCat("a mount is 1 to ", kMaxMountBytes,
             " letters, digits, '_', '.' or '-', begins with a letter or digit, and is not "
             "'sys'"));
}

absl::Status CheckKeyId(uint32_t key_id) {
  if (key_id >= 1) return absl::OkStatus();
  return absl::InvalidArgumentError("table-space key ids start at 1");
}

// Where a version's blob belongs, bound into its AES-GCM tag: no blob serves as another's.
EncryptionContext TdeContext(std::string_view mount, uint32_t key_id, uint32_t version) {
  return {{"custos:tde", StrCat(mount, "/", key_id, "/", version)}};
}

// The versions of one key id of a mount, each sealed under the Custos key `key`.
struct TdeKeySet {
  struct Version {
    uint32_t version = 0;
    std::string blob;  // base64 of the ciphertext blob
    int64_t created_at = 0;
  };
  std::string key;
  std::vector<Version> versions;  // ascending
};

std::string Encode(const TdeKeySet& set) {
  Json versions = Json::array();
  for (const TdeKeySet::Version& v : set.versions) {
    versions.push_back({{"version", v.version}, {"blob", v.blob}, {"created_at", v.created_at}});
  }
  return Json{{"key", set.key}, {"versions", versions}}.dump();
}

// Settings rows are written by this file only and checked before they are read: one that
// does not parse is damage, not input.
absl::StatusOr<TdeKeySet> DecodeKeySet(std::string_view text) {
  try {
    const Json json = Json::parse(text);
    TdeKeySet set;
    set.key = json.at("key").get<std::string>();
    for (const Json& v : json.at("versions")) {
      set.versions.push_back({v.at("version").get<uint32_t>(), v.at("blob").get<std::string>(),
                              v.at("created_at").get<int64_t>()});
    }
    return set;
  } catch (const Json::exception& e) {
    return absl::InternalError(StrCat("a stored table-space key does not parse: ", e.what()));
  }
}

struct DatabaseToken {
  std::string principal;
  std::string mount;
  std::set<uint32_t> key_ids;
  int64_t issued_at = 0;
  int64_t expires_at = 0;
  std::string request;     // the IssueDatabaseToken request
  std::string sha256;      // hex SHA-256 of the secret; empty until claimed
  int64_t claimed_at = 0;  // 0 until claimed
  int64_t revoked_at = 0;  // 0 unless revoked
};

std::string Encode(const DatabaseToken& token) {
  return Json{{"principal", token.principal},
              {"mount", token.mount},
              {"key_ids", std::vector<uint32_t>(token.key_ids.begin(), token.key_ids.end())},
              {"issued_at", token.issued_at},
              {"expires_at", token.expires_at},
              {"request", token.request},
              {"sha256", token.sha256},
              {"claimed_at", token.claimed_at},
              {"revoked_at", token.revoked_at}}
      .dump();
}

absl::StatusOr<DatabaseToken> DecodeToken(std::string_view text) {
  try {
    const Json json = Json::parse(text);
    DatabaseToken token;
    token.principal = json.at("principal").get<std::string>();
    token.mount = json.at("mount").get<std::string>();
    const auto ids = json.at("key_ids").get<std::vector<uint32_t>>();
    token.key_ids = {ids.begin(), ids.end()};
    token.issued_at = json.at("issued_at").get<int64_t>();
    token.expires_at = json.at("expires_at").get<int64_t>();
    token.request = json.at("request").get<std::string>();
    token.sha256 = json.at("sha256").get<std::string>();
    token.claimed_at = json.at("claimed_at").get<int64_t>();
    token.revoked_at = json.at("revoked_at").get<int64_t>();
    return token;
  } catch (const Json::exception& e) {
    return absl::InternalError(StrCat("a stored database token does not parse: ", e.what()));
  }
}

std::string Sha256Hex(std::string_view data) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  EVP_Digest(data.data(), data.size(), digest, &size, EVP_sha256(), nullptr);
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(digest), static_cast<size_t>(size)));
}

// A token id is a key id (a UUID, lower case as issued): anything else names no token.
bool ValidTokenId(std::string_view id) {
  return ParseKeyId(id).has_value() && AsciiLower(id) == id;
}

// A token's secret as claims make it: 64 lower-case hex digits.
bool WellFormedSecret(std::string_view secret) {
  return secret.size() == 2 * kTokenSecretBytes &&
         std::all_of(secret.begin(), secret.end(),
                     [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

// The setting that says a Custos key seals table-space keys: {"mounts": [...], "min_version":
// the lowest of its versions that sealed one}. One per key, written and read under that key's
// lock, so that no other key's sealing races it. Read by the checks that keep such a key
// usable (Kms::CheckTdeSealing).
std::string SealingSetting(std::string_view key_id) { return StrCat("tde-sealing/", key_id); }

absl::StatusOr<Json> SealingEntry(const storage::KeyStore& store, std::string_view key_id,
                                  storage::KeyStore::Absence absence) {
  CUSTOS_ASSIGN_OR_RETURN(const std::optional<std::string> stored,
                          store.GetSetting(SealingSetting(key_id), absence));
  if (!stored.has_value() || stored->empty()) return Json::object();
  try {
    return Json::parse(*stored);
  } catch (const Json::exception& e) {
    return absl::InternalError(StrCat("a table-space sealing entry does not parse: ", e.what()));
  }
}

std::string KeyIdList(const std::set<uint32_t>& ids) {
  std::string list;
  for (uint32_t id : ids) list += StrCat(list.empty() ? "" : ",", id);
  return list;
}

}  // namespace

std::string Kms::GatewayLockName(Operation operation, const OperationParams& params) {
  switch (operation) {
    case Operation::kCreateTdeKey:
    case Operation::kRotateTdeKey:
      return TdeSetting(params.tde.mount, params.tde.key_id);
    case Operation::kRevokeDatabaseToken:
      return TokenSetting(params.token_id);
    default:
      return "";  // an issued token is new: nothing else can change it yet
  }
}

absl::Status Kms::CheckTdeSealing(const storage::KeyRecord& key, Operation operation,
                                  const OperationParams& params) const {
  const bool grants = operation == Operation::kUpdateKeyGrants &&
                      (!params.encrypt_principals.empty() || !params.decrypt_principals.empty());
  if (operation != Operation::kDisableKey && operation != Operation::kScheduleKeyDeletion &&
      operation != Operation::kSetMinDecryptVersion && !grants) {
    return absl::OkStatus();
  }
  // Disabling can be undone (re-enabling): an absent entry is believed for it without a walk
  // of the log, so that a log found changed somewhere never keeps officers from disabling a
  // key. A deletion (destroyed once its waiting period ends), grants and a raised minimum
  // decrypt version wait for the walk.
  const bool undoable = operation == Operation::kDisableKey;
  CUSTOS_ASSIGN_OR_RETURN(const Json entry,
                          SealingEntry(*options_.store, key.id,
                                       undoable ? storage::KeyStore::Absence::kHarmless
                                                : storage::KeyStore::Absence::kProven));
  if (entry.empty()) return absl::OkStatus();
  if (operation == Operation::kSetMinDecryptVersion &&
      params.min_decrypt_version <= entry.at("min_version").get<uint32_t>()) {
    return absl::OkStatus();
  }
  std::string mounts;
  for (const std::string& mount : entry.at("mounts").get<std::vector<std::string>>()) {
    mounts += StrCat(mounts.empty() ? "" : ", ", mount);
  }
  return absl::FailedPreconditionError(StrCat(
      "key ", key.id, " seals the table-space keys of mount(s) ", mounts,
      grants ? ": it must grant nothing, or an app could open them"
             : ": databases could no longer read their tables (version ",
      grants ? "" : StrCat(entry.at("min_version").get<uint32_t>(), " and later seal them)")));
}

absl::Status Kms::CheckGatewayProposal(Operation operation, const OperationParams& params) {
  switch (operation) {
    case Operation::kCreateTdeKey:
    case Operation::kRotateTdeKey: {
      CUSTOS_RETURN_IF_ERROR(CheckMount(params.tde.mount));
      CUSTOS_RETURN_IF_ERROR(CheckKeyId(params.tde.key_id));
      CUSTOS_ASSIGN_OR_RETURN(
          const std::optional<std::string> stored,
          options_.store->GetSetting(TdeSetting(params.tde.mount, params.tde.key_id)));
      const bool exists = stored.has_value() && !stored->empty();
      if (operation == Operation::kRotateTdeKey) {
        if (!exists) {
          return absl::FailedPreconditionError(StrCat("mount '", params.tde.mount,
                                                      "' has no key id ", params.tde.key_id,
                                                      "; CreateTdeKey makes its first version"));
        }
        return absl::OkStatus();
      }
      if (exists) {
        return absl::AlreadyExistsError(StrCat("mount '", params.tde.mount, "' has key id ",
                                               params.tde.key_id,
                                               " already; RotateTdeKey adds a version"));
      }
      CUSTOS_ASSIGN_OR_RETURN(KeyRef key, FindKey(params.tde.key));
      if (key->state != KeyState::kEnabled) {
        return absl::FailedPreconditionError(
            StrCat("key ", key->id, " is ", storage::KeyStateName(key->state),
                   "; table-space keys are sealed under an ENABLED key"));
      }
      // An app granted the sealing key could open a copied blob: it must grant nothing.
      if (!key->encrypt_grants.empty() || !key->decrypt_grants.empty()) {
        return absl::FailedPreconditionError(
            StrCat("key ", key->id,
                   " grants apps its use; table-space keys are sealed under a "
                   "key that grants nothing (create one for them)"));
      }
      return absl::OkStatus();
    }
    case Operation::kIssueDatabaseToken: {
      const DatabaseTokenParams& token = params.token;
      if (token.principal.empty()) {
        return absl::InvalidArgumentError(
            "a token is issued to a principal: name the database (database_token.principal)");
      }
      if (CurrentPolicy()->RoleOf(token.principal) != policy::Role::kDatabase) {
        return absl::FailedPreconditionError(
            StrCat("principal '", token.principal,
                   "' is not a database in the policy; only databases hold gateway tokens"));
      }
      CUSTOS_RETURN_IF_ERROR(CheckMount(token.mount));
      if (token.key_ids.empty() || token.key_ids.size() > kMaxTokenKeyIds) {
        return absl::InvalidArgumentError(
            StrCat("a token is bound to 1 to ", kMaxTokenKeyIds, " key ids"));
      }
      CUSTOS_RETURN_IF_ERROR(CheckKeyId(*token.key_ids.begin()));
      if (token.ttl_days < 1 || token.ttl_days > kMaxTokenTtlDays) {
        return absl::InvalidArgumentError(
            StrCat("a token lives 1 to ", kMaxTokenTtlDays, " days (ttl_days)"));
      }
      return absl::OkStatus();
    }
    case Operation::kRevokeDatabaseToken: {
      if (!ValidTokenId(params.token_id)) {
        return absl::InvalidArgumentError("a token id is the UUID IssueDatabaseToken reported");
      }
      CUSTOS_ASSIGN_OR_RETURN(const std::optional<std::string> stored,
                              options_.store->GetSetting(TokenSetting(params.token_id),
                                                         storage::KeyStore::Absence::kHarmless));
      if (!stored.has_value() || stored->empty()) {
        return absl::NotFoundError(StrCat("no database token ", params.token_id));
      }
      CUSTOS_ASSIGN_OR_RETURN(const DatabaseToken token, DecodeToken(*stored));
      if (token.revoked_at != 0) {
        return absl::FailedPreconditionError(
            StrCat("database token ", params.token_id, " is revoked already"));
      }
      return absl::OkStatus();
    }
    default:
      return absl::InternalError("not a gateway operation");
  }
}

absl::StatusOr<Request> Kms::ExecuteGateway(Call& call, Request request,
                                            const OperationParams& params) {
  const Operation operation = *policy::ParseOperation(request.operation);
  const int64_t now = options_.clock->NowSeconds();
  std::string setting;
  std::string value;
  std::string detail;
  // When a version is sealed: its sealing key's lock, held to the commit, and its entry.
  KeyLocks::Held sealing_lock;
  std::string sealing_setting;
  std::string sealing_value;
  const absl::Status applied = [&]() -> absl::Status {
    // Checked again now: the catalogue or the policy may have changed since the proposal.
    CUSTOS_RETURN_IF_ERROR(CheckGatewayProposal(operation, params));
    switch (operation) {
      case Operation::kCreateTdeKey:
      case Operation::kRotateTdeKey: {
        const TdeKeyParams& tde = params.tde;
        setting = TdeSetting(tde.mount, tde.key_id);
        TdeKeySet set;
        if (operation == Operation::kCreateTdeKey) {
          CUSTOS_ASSIGN_OR_RETURN(const KeyRef named, FindKey(tde.key));
          set.key = named->id;
        } else {
          CUSTOS_ASSIGN_OR_RETURN(const std::optional<std::string> stored,
                                  options_.store->GetSetting(setting));
          CUSTOS_ASSIGN_OR_RETURN(set, DecodeKeySet(stored.value_or("")));
        }
        // The sealing key's lock too (after this key id's: nothing takes them the other way
        // round), so that no change to that key (disabling, granting) slips between the checks
        // here and the commit, and its sealing entry is changed by one execution at a time.
        sealing_lock = key_locks_.Lock(KeyLockName(set.key));
        CUSTOS_ASSIGN_OR_RETURN(const KeyRef key, options_.store->GetKey(set.key));
        if (key->state != KeyState::kEnabled) {
          return absl::FailedPreconditionError(
              StrCat("key ", key->id, " that seals mount '", tde.mount, "' key id ", tde.key_id,
                     " is ", storage::KeyStateName(key->state), "; it must be ENABLED"));
        }
        if (!key->encrypt_grants.empty() || !key->decrypt_grants.empty()) {
          return absl::FailedPreconditionError(
              StrCat("key ", key->id,
                     " grants apps its use; table-space keys "
                     "are sealed under a key that grants nothing"));
        }
        const uint32_t version = set.versions.empty() ? 1 : set.versions.back().version + 1;
        CUSTOS_ASSIGN_OR_RETURN(SecureBytes material, options_.hsm->GenerateRandom(kTdeKeyBytes));
        CUSTOS_ASSIGN_OR_RETURN(
            const Ciphertext sealed,
            EncryptUnder(*key, material.span(), TdeContext(tde.mount, tde.key_id, version),
                         /*reservation=*/nullptr));
        const std::string blob(sealed.ciphertext_blob.begin(), sealed.ciphertext_blob.end());
        set.versions.push_back({version, absl::Base64Escape(blob), now});
        value = Encode(set);
        detail = StrCat("mount=", tde.mount, " key_id=", tde.key_id, " version=", version,
                        " sealed under key ", key->id, " version ", sealed.key_version);
        CUSTOS_ASSIGN_OR_RETURN(Json entry, SealingEntry(*options_.store, key->id,
                                                         storage::KeyStore::Absence::kProven));
        std::set<std::string> mounts;
        if (entry.contains("mounts")) mounts = entry["mounts"].get<std::set<std::string>>();
        mounts.insert(tde.mount);
        const uint32_t lowest =
            entry.contains("min_version")
                ? std::min(entry["min_version"].get<uint32_t>(), sealed.key_version)
                : sealed.key_version;
        entry = Json{{"mounts", mounts}, {"min_version", lowest}};
        sealing_setting = SealingSetting(key->id);
        sealing_value = entry.dump();
        return absl::OkStatus();
      }
      case Operation::kIssueDatabaseToken: {
        const DatabaseTokenParams& p = params.token;
        const std::string id = NewKeyId();
        setting = TokenSetting(id);
        DatabaseToken token;
        token.principal = p.principal;
        token.mount = p.mount;
        token.key_ids = p.key_ids;
        token.issued_at = now;
        const ObservedTime::Bounds time = observed_.WallBounds();
        token.expires_at = time.latest + p.ttl_days * policy::kDay;
        token.request = request.id;
        value = Encode(token);
        detail = StrCat("token ", id, " for '", p.principal, "': mount=", p.mount,
                        " key_ids=", KeyIdList(p.key_ids), " expires_at=", token.expires_at,
                        "; the database claims it with ClaimDatabaseToken");
        return absl::OkStatus();
      }
      case Operation::kRevokeDatabaseToken: {
        setting = TokenSetting(params.token_id);
        CUSTOS_ASSIGN_OR_RETURN(
            const std::optional<std::string> stored,
            options_.store->GetSetting(setting, storage::KeyStore::Absence::kHarmless));
        CUSTOS_ASSIGN_OR_RETURN(DatabaseToken token, DecodeToken(stored.value_or("")));
        token.revoked_at = now;
        value = Encode(token);
        detail = StrCat("token ", params.token_id, " of '", token.principal, "' revoked");
        return absl::OkStatus();
      }
      default:
        return absl::InternalError("not a gateway operation");
    }
  }();
  // An unreachable HSM leaves the request as it was: the approval can simply be given again.
  if (absl::IsUnavailable(applied)) return applied;
  if (!applied.ok()) return CloseFailed(call, std::move(request), applied);
  request.closed_at = now;
  request.state = RequestState::kExecuted;
  request.reason = StrCat(request.operation, " executed; ", detail);
  storage::WriteBatch batch;
  batch.settings.emplace(setting, value);
  batch.requests.push_back(request);
  audit::Event executed =
      ServerEvent(request.operation, "", request.id, absl::StatusCode::kOk, detail);
  // Two rows change: the request (the approval's record) and the setting (the execution's);
  // a sealed version also updates its sealing key's entry, with a record of its own.
  call.event().row = storage::RequestRowName(request.id);
  executed.row = storage::SettingRowName(setting);
  std::vector<audit::Event> records = {executed};
  if (!sealing_setting.empty()) {
    batch.settings.emplace(sealing_setting, sealing_value);
    audit::Event indexed = ServerEvent("TdeSealingKey", "", request.id, absl::StatusCode::kOk);
    indexed.row = storage::SettingRowName(sealing_setting);
    records.push_back(std::move(indexed));
  }
  CUSTOS_RETURN_IF_ERROR(call.CommitWith(std::move(batch), absl::StatusCode::kOk, records));
  return request;
}

absl::StatusOr<SecureBytes> Kms::ClaimDatabaseToken(const Caller& caller,
                                                    std::string_view token_id) {
  Call call(*this, caller, Action::kClaimDatabaseToken);
  return call.Finish([&]() -> absl::StatusOr<SecureBytes> {
    CUSTOS_RETURN_IF_ERROR(call.Authorize());
    if (!ValidTokenId(token_id)) {
      return absl::InvalidArgumentError("a token id is the UUID IssueDatabaseToken reported");
    }
    const std::string setting = TokenSetting(token_id);
    call.event().detail = StrCat("token ", token_id);
    ChangeLock lock = LockShared(setting);  // one claim at a time: the first wins
    CUSTOS_ASSIGN_OR_RETURN(
        const std::optional<std::string> stored,
        options_.store->GetSetting(setting, storage::KeyStore::Absence::kHarmless));
    if (!stored.has_value() || stored->empty()) {
      return absl::NotFoundError(StrCat("no database token ", token_id));
    }
    CUSTOS_ASSIGN_OR_RETURN(DatabaseToken token, DecodeToken(*stored));
    if (token.principal != caller.principal) {
      return absl::PermissionDeniedError(
          StrCat("database token ", token_id, " was issued to another principal"));
    }
    const int64_t now = options_.clock->NowSeconds();
    const ObservedTime::Bounds time = observed_.WallBounds();
    if (token.revoked_at != 0 || token.expires_at <= time.latest || token.claimed_at != 0) {
      return absl::FailedPreconditionError(
          StrCat("database token ", token_id, " is ",
                 token.revoked_at != 0 ? "revoked"
                 : token.claimed_at != 0
                     ? "claimed already (a token is shown once; have officers revoke it and "
                       "issue another)"
                     : "expired"));
    }
    CUSTOS_ASSIGN_OR_RETURN(const SecureBytes random,
                            options_.hsm->GenerateRandom(kTokenSecretBytes));
    // "cdt.<id>.<hex secret>", built in wiped memory.
    static constexpr char kHex[] = "0123456789abcdef";
    const std::string head = StrCat(kTokenPrefix, token_id, ".");
    SecureBytes text(head.size() + 2 * random.size());
    std::copy(head.begin(), head.end(), text.data());
    for (size_t i = 0; i < random.size(); ++i) {
      text.data()[head.size() + 2 * i] = kHex[random.data()[i] >> 4];
      text.data()[head.size() + 2 * i + 1] = kHex[random.data()[i] & 0x0f];
    }
    token.sha256 = Sha256Hex(text.view().substr(head.size()));
    token.claimed_at = now;
    storage::WriteBatch batch;
    batch.settings.emplace(setting, Encode(token));
    call.event().row = storage::SettingRowName(setting);
    call.event().detail = StrCat("token ", token_id, " mount=", token.mount, " claimed");
    CUSTOS_RETURN_IF_ERROR(call.CommitWith(std::move(batch)));
    return text;
  }());
}

absl::StatusOr<Kms::TdeKey> Kms::FetchTdeKey(std::string_view peer, std::string_view token,
                                             std::string_view mount, uint32_t key_id,
                                             std::optional<uint32_t> version,
                                             const absl::Status& request) {
  // The principal is the token's, once the token is checked; until then the call is nobody's.
  Caller caller{"", std::string(peer)};
  Call call(*this, caller, Action::kFetchTdeKey);
  return call.Finish([&]() -> absl::StatusOr<TdeKey> {
    call.event().detail = mount.empty()
                              ? std::string(request.message())
                              : StrCat("mount=", mount, " key_id=", key_id,
                                       version ? StrCat(" version=", *version) : "",
                                       request.ok() ? "" : StrCat(" (", request.message(), ")"));
    // "cdt.<token id>.<secret>"
    const absl::Status refused = absl::PermissionDeniedError(
        "the token is not valid: unknown, wrong, not yet claimed, revoked or expired");
    if (token.substr(0, sizeof(kTokenPrefix) - 1) != kTokenPrefix) return refused;
    const std::string_view rest = token.substr(sizeof(kTokenPrefix) - 1);
    const size_t dot = rest.find('.');
    // Checked before anything is read: a malformed token costs no HSM call.
    if (dot == std::string_view::npos || !ValidTokenId(rest.substr(0, dot)) ||
        !WellFormedSecret(rest.substr(dot + 1))) {
      return refused;
    }
    const std::string setting = TokenSetting(rest.substr(0, dot));
    CUSTOS_ASSIGN_OR_RETURN(
        const std::optional<std::string> stored,
        options_.store->GetSetting(setting, storage::KeyStore::Absence::kHarmless));
    if (!stored.has_value() || stored->empty()) return refused;
    CUSTOS_ASSIGN_OR_RETURN(const DatabaseToken held, DecodeToken(*stored));
    const std::string presented = Sha256Hex(rest.substr(dot + 1));
    if (held.sha256.size() != presented.size() ||
        CRYPTO_memcmp(held.sha256.data(), presented.data(), presented.size()) != 0) {
      return refused;
    }
    caller.principal = held.principal;
    call.event().principal = held.principal;
    const ObservedTime::Bounds time = observed_.WallBounds();
    if (held.revoked_at != 0 || held.expires_at <= time.latest) return refused;
    CUSTOS_RETURN_IF_ERROR(call.Authorize());  // still a database in the policy as it is now
    CUSTOS_RETURN_IF_ERROR(request);
    // Outside the token's binding is answered as what does not exist.
    const absl::Status missing = absl::NotFoundError(
        StrCat("mount '", mount, "' has no key id ", key_id,
               version ? StrCat(" version ", *version) : "", " for this token"));
    if (mount != held.mount || held.key_ids.count(key_id) == 0) return missing;
    CUSTOS_ASSIGN_OR_RETURN(const std::optional<std::string> set_text,
                            options_.store->GetSetting(TdeSetting(mount, key_id),
                                                       storage::KeyStore::Absence::kHarmless));
    if (!set_text.has_value() || set_text->empty()) return missing;
    CUSTOS_ASSIGN_OR_RETURN(const TdeKeySet set, DecodeKeySet(*set_text));
    auto found = set.versions.end();
    if (!version) {
      if (!set.versions.empty()) found = std::prev(set.versions.end());
    } else {
      found = std::find_if(set.versions.begin(), set.versions.end(),
                           [&](const TdeKeySet::Version& v) { return v.version == *version; });
    }
    if (found == set.versions.end()) return missing;
    call.event().detail = StrCat("mount=", mount, " key_id=", key_id, " version=", found->version);
    std::string blob;
    if (!absl::Base64Unescape(found->blob, &blob)) {
      return absl::InternalError("a stored table-space key's blob is not base64");
    }
    CUSTOS_ASSIGN_OR_RETURN(
        const ParsedBlob parsed,
        ParseBlob({reinterpret_cast<const uint8_t*>(blob.data()), blob.size()}));
    CUSTOS_ASSIGN_OR_RETURN(const KeyRef key, options_.store->GetKey(set.key));
    call.SetKey(*key, parsed.header.key_version);
    if (key->state != KeyState::kEnabled) {
      return absl::FailedPreconditionError(StrCat("key ", key->id, " that seals mount '", mount,
                                                  "' is ", storage::KeyStateName(key->state),
                                                  "; only ENABLED keys can be used"));
    }
    CUSTOS_ASSIGN_OR_RETURN(Plaintext opened,
                            OpenBlob(*key, parsed, TdeContext(mount, key_id, found->version)));
    return TdeKey{found->version, std::move(opened.plaintext)};
  }());
}

}  // namespace custos::core
