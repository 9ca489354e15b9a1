#include "core/operation_params.h"

#include <openssl/evp.h>

#include <utility>

#include <nlohmann/json.hpp>

#include "common/strings.h"

namespace custos::core {
namespace {

using policy::Operation;
using Json = nlohmann::json;

Json Principals(const std::set<std::string>& principals) {
  return Json(std::vector<std::string>(principals.begin(), principals.end()));
}

std::set<std::string> PrincipalsFrom(const Json& json) {
  const auto list = json.get<std::vector<std::string>>();
  return {list.begin(), list.end()};
}

}  // namespace

std::string EncodeParams(Operation operation, const OperationParams& params) {
  Json json = Json::object();
  switch (operation) {
    case Operation::kCreateKey:
      json["alias"] = params.create.alias;
      json["description"] = params.create.description;
      json["tags"] = params.create.tags;
      json["encrypt_principals"] = Principals(params.create.encrypt_principals);
      json["decrypt_principals"] = Principals(params.create.decrypt_principals);
      json["rotation_period_days"] = params.create.rotation_period_days;
      break;
    case Operation::kUpdateKeyGrants:
      json["encrypt_principals"] = Principals(params.encrypt_principals);
      json["decrypt_principals"] = Principals(params.decrypt_principals);
      break;
    case Operation::kSetMinDecryptVersion:
      json["min_decrypt_version"] = params.min_decrypt_version;
      break;
    case Operation::kScheduleKeyDeletion:
      json["deletion_waiting_days"] = params.deletion_waiting_days;
      break;
    case Operation::kCreateTdeKey:
      json["key"] = params.tde.key;
      [[fallthrough]];
    case Operation::kRotateTdeKey:
      json["mount"] = params.tde.mount;
      json["key_id"] = params.tde.key_id;
      break;
    case Operation::kIssueDatabaseToken:
      json["principal"] = params.token.principal;
      json["mount"] = params.token.mount;
      json["key_ids"] =
          std::vector<uint32_t>(params.token.key_ids.begin(), params.token.key_ids.end());
      json["ttl_days"] = params.token.ttl_days;
      break;
    case Operation::kRevokeDatabaseToken:
      json["token_id"] = params.token_id;
      break;
    case Operation::kArchiveAuditLog:
      json["through_seq"] = params.archive_through;
      break;
    case Operation::kRotateKey:
    case Operation::kDisableKey:
    case Operation::kEnableKey:
    case Operation::kCancelKeyDeletion:
    case Operation::kRotateRootKey:
    case Operation::kReAnchorAuditLog:
      break;
  }
  return json.dump();  // nlohmann::json keeps object keys sorted: the text is canonical.
}

absl::StatusOr<OperationParams> DecodeParams(Operation operation, std::string_view text) {
  OperationParams params;
  try {
    const Json json = Json::parse(text);
    switch (operation) {
      case Operation::kCreateKey:
        params.create.alias = json.at("alias").get<std::string>();
        params.create.description = json.at("description").get<std::string>();
        params.create.tags = json.at("tags").get<std::map<std::string, std::string>>();
        params.create.encrypt_principals = PrincipalsFrom(json.at("encrypt_principals"));
        params.create.decrypt_principals = PrincipalsFrom(json.at("decrypt_principals"));
        params.create.rotation_period_days = json.at("rotation_period_days").get<int64_t>();
        break;
      case Operation::kUpdateKeyGrants:
        params.encrypt_principals = PrincipalsFrom(json.at("encrypt_principals"));
        params.decrypt_principals = PrincipalsFrom(json.at("decrypt_principals"));
        break;
      case Operation::kSetMinDecryptVersion:
        params.min_decrypt_version = json.at("min_decrypt_version").get<uint32_t>();
        break;
      case Operation::kScheduleKeyDeletion:
        params.deletion_waiting_days = json.at("deletion_waiting_days").get<int64_t>();
        break;
      case Operation::kCreateTdeKey:
        params.tde.key = json.at("key").get<std::string>();
        [[fallthrough]];
      case Operation::kRotateTdeKey:
        params.tde.mount = json.at("mount").get<std::string>();
        params.tde.key_id = json.at("key_id").get<uint32_t>();
        break;
      case Operation::kIssueDatabaseToken: {
        params.token.principal = json.at("principal").get<std::string>();
        params.token.mount = json.at("mount").get<std::string>();
        const auto ids = json.at("key_ids").get<std::vector<uint32_t>>();
        params.token.key_ids = {ids.begin(), ids.end()};
        params.token.ttl_days = json.at("ttl_days").get<int64_t>();
        break;
      }
      case Operation::kRevokeDatabaseToken:
        params.token_id = json.at("token_id").get<std::string>();
        break;
      case Operation::kArchiveAuditLog:
        params.archive_through = json.at("through_seq").get<uint64_t>();
        break;
      case Operation::kRotateKey:
      case Operation::kDisableKey:
      case Operation::kEnableKey:
      case Operation::kCancelKeyDeletion:
      case Operation::kRotateRootKey:
      case Operation::kReAnchorAuditLog:
        break;
    }
  } catch (const Json::exception& e) {
    return absl::InternalError(StrCat("stored request parameters do not parse: ", e.what()));
  }
  return params;
}

absl::Status RefuseUnusedParams(Operation operation, const OperationParams& params) {
  // What the stored request would carry, read back: a field it drops comes back as its
  // default, so it differs from what was given only if it was set.
  CUSTOS_ASSIGN_OR_RETURN(const OperationParams kept,
                          DecodeParams(operation, EncodeParams(operation, params)));
  const CreateKeyParams& a = params.create;
  const CreateKeyParams& b = kept.create;
  const std::pair<const char*, bool> dropped[] = {
      {"create_key", a.alias != b.alias || a.description != b.description || a.tags != b.tags ||
                         a.encrypt_principals != b.encrypt_principals ||
                         a.decrypt_principals != b.decrypt_principals ||
                         a.rotation_period_days != b.rotation_period_days},
      {"encrypt_principals", params.encrypt_principals != kept.encrypt_principals},
      {"decrypt_principals", params.decrypt_principals != kept.decrypt_principals},
      {"min_decrypt_version", params.min_decrypt_version != kept.min_decrypt_version},
      {"deletion_waiting_days", params.deletion_waiting_days != kept.deletion_waiting_days},
      {"tde_key.mount", params.tde.mount != kept.tde.mount},
      {"tde_key.key_id", params.tde.key_id != kept.tde.key_id},
      {"tde_key.key", params.tde.key != kept.tde.key},
      {"database_token", params.token.principal != kept.token.principal ||
                             params.token.mount != kept.token.mount ||
                             params.token.key_ids != kept.token.key_ids ||
                             params.token.ttl_days != kept.token.ttl_days},
      {"token_id", params.token_id != kept.token_id},
      {"archive_through", params.archive_through != kept.archive_through},
  };
  for (const auto& [field, was_dropped] : dropped) {
    if (was_dropped) {
      return absl::InvalidArgumentError(
          StrCat(field, " does not apply to ", policy::OperationName(operation),
                 ": the request would be stored, approved and executed without it"));
    }
  }
  return absl::OkStatus();
}

std::string RequestDigest(const Request& request) {
  // Length-prefixed fields, so no two different requests share an encoding.
  std::string canonical;
  for (const std::string& field :
       {request.id, request.operation, request.key_id, request.parameters, request.justification,
        request.proposer, std::to_string(request.created_at), std::to_string(request.expires_at)}) {
    canonical += StrCat(field.size(), ":", field, ";");
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_Digest(canonical.data(), canonical.size(), digest, &length, EVP_sha256(), nullptr);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned int i = 0; i < length; ++i) {
    hex.push_back(kHex[digest[i] >> 4]);
    hex.push_back(kHex[digest[i] & 0x0f]);
  }
  return hex;
}

}  // namespace custos::core
