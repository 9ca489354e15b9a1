// KeyService end to end: round trips of every RPC, and every kind of bad input refused with
// its exact status, a message a person can act on, and no change to the catalogue.
#include <catch2/catch.hpp>

#include "tests/e2e/e2e_util.h"

namespace custos::testing {
namespace {

using grpc::StatusCode;

std::map<std::string, std::string> PatientContext() {
  return {{"table", "patients"}, {"tenant", "st-mary"}};
}

pb::GenerateDataKeyResponse GenerateDataKey(pb::KeyService::Stub& keys, const std::string& key,
                                            const std::map<std::string, std::string>& context) {
  pb::GenerateDataKeyRequest req;
  req.set_key(key);
  req.mutable_encryption_context()->insert(context.begin(), context.end());
  pb::GenerateDataKeyResponse reply;
  grpc::Status status = keys.GenerateDataKey(Context().get(), req, &reply);
  INFO(status.error_message());
  REQUIRE(status.ok());
  return reply;
}

grpc::Status Decrypt(pb::KeyService::Stub& keys, const std::string& blob,
                     const std::map<std::string, std::string>& context,
                     pb::DecryptResponse* reply) {
  pb::DecryptRequest req;
  req.set_ciphertext_blob(blob);
  req.mutable_encryption_context()->insert(context.begin(), context.end());
  return keys.Decrypt(Context().get(), req, reply);
}

// Decrypt must fail with `code` and a message containing `message`.
void ExpectDecryptError(pb::KeyService::Stub& keys, const std::string& blob,
                        const std::map<std::string, std::string>& context, StatusCode code,
                        const std::string& message) {
  pb::DecryptResponse reply;
  grpc::Status status = Decrypt(keys, blob, context, &reply);
  INFO("status: " << status.error_code() << " " << status.error_message());
  CHECK(status.error_code() == code);
  CHECK_THAT(status.error_message(), Catch::Contains(message));
  CHECK(reply.plaintext().empty());
}

TEST_CASE("GenerateDataKey round-trips through Decrypt by id and by alias", "[e2e][keys]") {
  CustosServer& server = CustosServer::Shared();
  const std::string alias = UniqueAlias("tde");
  const pb::KeyMetadata key = CreateKey(server, alias, true, true);
  auto keys = server.Keys("app");

  for (const std::string& name : {key.key_id(), alias}) {
    const pb::GenerateDataKeyResponse dk = GenerateDataKey(*keys, name, PatientContext());
    CHECK(dk.plaintext().size() == 32);
    CHECK(dk.key_id() == key.key_id());
    CHECK(dk.key_version() == 1);
    CHECK(dk.ciphertext_blob().size() == 1 + 16 + 4 + 12 + 32 + 16);
    pb::DecryptResponse opened;
    REQUIRE(Decrypt(*keys, dk.ciphertext_blob(), PatientContext(), &opened).ok());
    CHECK(opened.plaintext() == dk.plaintext());
    CHECK(opened.key_id() == key.key_id());
    CHECK(opened.key_version() == 1);
  }

  SECTION("AES-128 data keys are 16 bytes") {
    pb::GenerateDataKeyRequest req;
    req.set_key(alias);
    req.set_key_spec(pb::AES_128);
    pb::GenerateDataKeyResponse dk;
    REQUIRE(keys->GenerateDataKey(Context().get(), req, &dk).ok());
    CHECK(dk.plaintext().size() == 16);
    pb::DecryptResponse opened;
    REQUIRE(Decrypt(*keys, dk.ciphertext_blob(), {}, &opened).ok());
    CHECK(opened.plaintext() == dk.plaintext());
  }

  SECTION("two data keys differ") {
    CHECK(GenerateDataKey(*keys, alias, {}).plaintext() !=
          GenerateDataKey(*keys, alias, {}).plaintext());
  }
}

TEST_CASE("GenerateDataKeyWithoutPlaintext returns a blob that decrypts", "[e2e][keys]") {
  CustosServer& server = CustosServer::Shared();
  const std::string alias = UniqueAlias("noplain");
  CreateKey(server, alias, true, true);
  auto keys = server.Keys("app");
  pb::GenerateDataKeyRequest req;
  req.set_key(alias);
  req.mutable_encryption_context()->insert({"db", "emr"});
  pb::GenerateDataKeyWithoutPlaintextResponse dk;
  REQUIRE(keys->GenerateDataKeyWithoutPlaintext(Context().get(), req, &dk).ok());
  pb::DecryptResponse opened;
  REQUIRE(Decrypt(*keys, dk.ciphertext_blob(), {{"db", "emr"}}, &opened).ok());
  CHECK(opened.plaintext().size() == 32);
}

TEST_CASE("Encrypt takes 1..4096 bytes and Decrypt returns them", "[e2e][keys]") {
  CustosServer& server = CustosServer::Shared();
  const std::string alias = UniqueAlias("secrets");
  CreateKey(server, alias, true, true);
  auto keys = server.Keys("app");
  const std::string before = CatalogSnapshot(server);

  for (size_t size : {size_t{1}, size_t{100}, size_t{4096}}) {
    pb::EncryptRequest req;
    req.set_key(alias);
    req.set_plaintext(std::string(size, 'x'));
    pb::EncryptResponse sealed;
    REQUIRE(keys->Encrypt(Context().get(), req, &sealed).ok());
    CHECK(sealed.ciphertext_blob().size() == 49 + size);
    pb::DecryptResponse opened;
    REQUIRE(Decrypt(*keys, sealed.ciphertext_blob(), {}, &opened).ok());
    CHECK(opened.plaintext() == req.plaintext());
  }
  for (auto [size, message] : {std::pair<size_t, std::string>{4097, "at most 4096"},
                               std::pair<size_t, std::string>{0, "plaintext is empty"}}) {
    pb::EncryptRequest req;
    req.set_key(alias);
    req.set_plaintext(std::string(size, 'x'));
    pb::EncryptResponse sealed;
    grpc::Status status = keys->Encrypt(Context().get(), req, &sealed);
    CHECK(status.error_code() == StatusCode::INVALID_ARGUMENT);
    CHECK_THAT(status.error_message(), Catch::Contains(message));
  }
  CHECK(CatalogSnapshot(server) == before);
}

TEST_CASE("ReEncrypt moves a blob to another key and context without showing plaintext",
          "[e2e][keys]") {
  CustosServer& server = CustosServer::Shared();
  const std::string from = UniqueAlias("from");
  const std::string to = UniqueAlias("to");
  const pb::KeyMetadata from_key = CreateKey(server, from, true, true);
  const pb::KeyMetadata to_key = CreateKey(server, to, true, true);
  auto keys = server.Keys("app");
  const pb::GenerateDataKeyResponse dk = GenerateDataKey(*keys, from, {{"v", "1"}});

  pb::ReEncryptRequest req;
  req.set_ciphertext_blob(dk.ciphertext_blob());
  req.mutable_source_encryption_context()->insert({"v", "1"});
  req.set_destination_key(to);
  req.mutable_destination_encryption_context()->insert({"v", "2"});
  pb::ReEncryptResponse moved;
  grpc::Status status = keys->ReEncrypt(Context().get(), req, &moved);
  INFO(status.error_message());
  REQUIRE(status.ok());
  CHECK(moved.source_key_id() == from_key.key_id());
  CHECK(moved.source_key_version() == 1);
  CHECK(moved.key_id() == to_key.key_id());
  CHECK(moved.key_version() == 1);

  pb::DecryptResponse opened;
  REQUIRE(Decrypt(*keys, moved.ciphertext_blob(), {{"v", "2"}}, &opened).ok());
  CHECK(opened.plaintext() == dk.plaintext());
  CHECK(opened.key_id() == to_key.key_id());
  ExpectDecryptError(*keys, moved.ciphertext_blob(), {{"v", "1"}}, StatusCode::INVALID_ARGUMENT,
                     "encryption context differs");

  SECTION("an empty destination keeps the blob's own key") {
    req.clear_destination_key();
    REQUIRE(keys->ReEncrypt(Context().get(), req, &moved).ok());
    CHECK(moved.key_id() == from_key.key_id());
    REQUIRE(Decrypt(*keys, moved.ciphertext_blob(), {{"v", "2"}}, &opened).ok());
    CHECK(opened.plaintext() == dk.plaintext());
  }
  SECTION("a wrong source context is refused") {
    (*req.mutable_source_encryption_context())["v"] = "2";
    status = keys->ReEncrypt(Context().get(), req, &moved);
    CHECK(status.error_code() == StatusCode::INVALID_ARGUMENT);
    CHECK_THAT(status.error_message(), Catch::Contains("failed authentication"));
  }
  SECTION("an unknown destination key is refused as one not granted") {
    req.set_destination_key("e2e/no-such-key");
    status = keys->ReEncrypt(Context().get(), req, &moved);
    CHECK(status.error_code() == StatusCode::PERMISSION_DENIED);
    CHECK_THAT(status.error_message(),
               Catch::EndsWith("encrypt grant on key 'e2e/no-such-key', or no such key exists"));
  }
}

TEST_CASE("Decrypt refuses any change to the encryption context", "[e2e][keys]") {
  CustosServer& server = CustosServer::Shared();
  const std::string alias = UniqueAlias("ctx");
  CreateKey(server, alias, true, true);
  auto keys = server.Keys("app");
  const std::string blob = GenerateDataKey(*keys, alias, PatientContext()).ciphertext_blob();
  const std::string before = CatalogSnapshot(server);
  const std::string expected = "ciphertext failed authentication";

  auto changed = PatientContext();
  changed["tenant"] = "st-mark";
  ExpectDecryptError(*keys, blob, changed, StatusCode::INVALID_ARGUMENT, expected);
  auto added = PatientContext();
  added["extra"] = "1";
  ExpectDecryptError(*keys, blob, added, StatusCode::INVALID_ARGUMENT, expected);
  auto removed = PatientContext();
  removed.erase("table");
  ExpectDecryptError(*keys, blob, removed, StatusCode::INVALID_ARGUMENT, expected);
  ExpectDecryptError(*keys, blob, {}, StatusCode::INVALID_ARGUMENT, expected);
  auto renamed = PatientContext();
  renamed.erase("table");
  renamed["Table"] = "patients";
  ExpectDecryptError(*keys, blob, renamed, StatusCode::INVALID_ARGUMENT, expected);
  ExpectDecryptError(*keys, blob, {{"", "x"}}, StatusCode::INVALID_ARGUMENT,
                     "encryption context has an empty key");

  pb::DecryptResponse opened;
  CHECK(Decrypt(*keys, blob, PatientContext(), &opened).ok());
  CHECK(CatalogSnapshot(server) == before);
}

TEST_CASE("Decrypt refuses every single-byte change, truncation and empty blob", "[e2e][keys]") {
  CustosServer& server = CustosServer::Shared();
  const std::string alias = UniqueAlias("flip");
  CreateKey(server, alias, true, true);
  auto keys = server.Keys("app");
  const std::string blob = GenerateDataKey(*keys, alias, PatientContext()).ciphertext_blob();
  const std::string before = CatalogSnapshot(server);

  for (size_t i = 0; i < blob.size(); ++i) {
    std::string flipped = blob;
    flipped[i] = static_cast<char>(flipped[i] ^ 0x01);
    // Which check catches the flip depends on the field it lands in; each says what is wrong.
    std::string message = "ciphertext failed authentication";
    if (i == 0) message = "unknown format";
    // A key id that names no key is answered as one the app may not use (no enumeration).
    StatusCode code = StatusCode::INVALID_ARGUMENT;
    if (i >= 1 && i < 17) {
      code = StatusCode::PERMISSION_DENIED;
      message = "has no decrypt grant on key '";
    }
    if (i >= 17 && i < 21) message = "which does not exist";
    INFO("byte " << i);
    ExpectDecryptError(*keys, flipped, PatientContext(), code, message);
  }
  for (size_t size = 1; size < blob.size(); ++size) {
    INFO("truncated to " << size);
    ExpectDecryptError(*keys, blob.substr(0, size), PatientContext(), StatusCode::INVALID_ARGUMENT,
                       size < 49 ? "truncated" : "failed authentication");
  }
  ExpectDecryptError(*keys, "", PatientContext(), StatusCode::INVALID_ARGUMENT,
                     "ciphertext blob is empty");
  // Longer than any blob (4 KiB sealed): refused before the HSM sees it.
  ExpectDecryptError(*keys, blob + std::string(4146 - blob.size(), 'x'), PatientContext(),
                     StatusCode::INVALID_ARGUMENT,
                     "ciphertext blob is too long: 4146 bytes, at most 4145 expected");

  pb::DecryptResponse opened;
  CHECK(Decrypt(*keys, blob, PatientContext(), &opened).ok());
  CHECK(CatalogSnapshot(server) == before);
  CHECK(server.Alive());
}

TEST_CASE("An app cannot tell a key that does not exist from one it may not use",
          "[e2e][keys][authz]") {
  CustosServer& server = CustosServer::Shared();
  const std::string theirs = UniqueAlias("theirs");
  const pb::KeyMetadata theirs_key = CreateKey(server, theirs, false, false);
  auto keys = server.Keys("app");
  const std::string before = CatalogSnapshot(server);
  for (const std::string& name :
       {std::string("e2e/never-created"), std::string("0b5e7d0c-1c7a-4b8e-9d7e-2f8a5c3b1d00"),
        theirs, theirs_key.key_id()}) {
    INFO(name);
    pb::GenerateDataKeyRequest req;
    req.set_key(name);
    pb::GenerateDataKeyResponse reply;
    grpc::Status status = keys->GenerateDataKey(Context().get(), req, &reply);
    CHECK(status.error_code() == StatusCode::PERMISSION_DENIED);
    CHECK(status.error_message() == "principal '" + std::string(kAppPrincipal) +
                                        "' has no encrypt grant on key '" + name +
                                        "', or no such key exists");
    CHECK(reply.plaintext().empty());
  }
  pb::EncryptRequest req;
  req.set_plaintext("x");
  pb::EncryptResponse reply;
  grpc::Status status = keys->Encrypt(Context().get(), req, &reply);
  CHECK(status.error_code() == StatusCode::INVALID_ARGUMENT);
  CHECK_THAT(status.error_message(), Catch::Contains("name a key id or alias"));
  CHECK(CatalogSnapshot(server) == before);
}

TEST_CASE("An app uses only the keys and operations it is granted", "[e2e][keys][authz]") {
  CustosServer& server = CustosServer::Shared();
  const std::string none = UniqueAlias("nogrant");
  const std::string encrypt_only = UniqueAlias("encrypt-only");
  CreateKey(server, none, false, false);
  CreateKey(server, encrypt_only, true, false);
  auto keys = server.Keys("app");
  pb::GenerateDataKeyRequest req;
  req.set_key(none);
  pb::GenerateDataKeyResponse reply;
  grpc::Status status = keys->GenerateDataKey(Context().get(), req, &reply);
  CHECK(status.error_code() == StatusCode::PERMISSION_DENIED);
  CHECK(status.error_message() == "principal '" + std::string(kAppPrincipal) +
                                      "' has no encrypt grant on key '" + none +
                                      "', or no such key exists");
  CHECK(reply.plaintext().empty());

  const std::string blob = GenerateDataKey(*keys, encrypt_only, {}).ciphertext_blob();
  ExpectDecryptError(*keys, blob, {}, StatusCode::PERMISSION_DENIED, "has no decrypt grant");

  pb::EncryptRequest encrypt;
  encrypt.set_key(none);
  encrypt.set_plaintext("x");
  pb::EncryptResponse sealed;
  status = keys->Encrypt(Context().get(), encrypt, &sealed);
  CHECK(status.error_code() == StatusCode::PERMISSION_DENIED);
  CHECK_THAT(status.error_message(), Catch::Contains("has no encrypt grant"));

  // ReEncrypt needs decrypt on the source and encrypt on the destination.
  pb::ReEncryptRequest move;
  move.set_ciphertext_blob(blob);
  move.set_destination_key(encrypt_only);
  pb::ReEncryptResponse moved;
  status = keys->ReEncrypt(Context().get(), move, &moved);
  CHECK(status.error_code() == StatusCode::PERMISSION_DENIED);
  CHECK_THAT(status.error_message(), Catch::Contains("has no decrypt grant"));
  const std::string both = UniqueAlias("both");
  CreateKey(server, both, true, true);
  move.set_ciphertext_blob(GenerateDataKey(*keys, both, {}).ciphertext_blob());
  move.set_destination_key(none);
  status = keys->ReEncrypt(Context().get(), move, &moved);
  CHECK(status.error_code() == StatusCode::PERMISSION_DENIED);
  CHECK(status.error_message() == "principal '" + std::string(kAppPrincipal) +
                                      "' has no encrypt grant on key '" + none +
                                      "', or no such key exists");
  CHECK(moved.ciphertext_blob().empty());
}

TEST_CASE("Officers and auditors are refused on KeyService", "[e2e][keys][authz]") {
  CustosServer& server = CustosServer::Shared();
  const std::string alias = UniqueAlias("sod");
  CreateKey(server, alias, true, true);
  const std::string blob = GenerateDataKey(*server.Keys("app"), alias, {}).ciphertext_blob();
  const std::string before = CatalogSnapshot(server);

  for (const char* who : {"officer1", "officer2", "auditor"}) {
    auto keys = server.Keys(who);
    pb::GenerateDataKeyRequest req;
    req.set_key(alias);
    pb::GenerateDataKeyResponse reply;
    grpc::Status status = keys->GenerateDataKey(Context().get(), req, &reply);
    INFO(who << ": " << status.error_message());
    CHECK(status.error_code() == StatusCode::PERMISSION_DENIED);
    CHECK_THAT(status.error_message(), Catch::Contains("may not perform GenerateDataKey"));
    CHECK(reply.plaintext().empty());
    ExpectDecryptError(*keys, blob, {}, StatusCode::PERMISSION_DENIED, "may not perform Decrypt");
  }
  CHECK(CatalogSnapshot(server) == before);
}

}  // namespace
}  // namespace custos::testing
