// Small helpers shared by the end-to-end tests.
#pragma once

#include <catch2/catch.hpp>
#include <string>

#include "tests/e2e/custos_server.h"

namespace custos::testing {

namespace pb = custos::v1;

// Creates a key as officer1; REQUIREs success.
inline pb::KeyMetadata CreateKey(CustosServer& server, const std::string& alias, bool encrypt_grant,
                                 bool decrypt_grant) {
  pb::CreateKeyRequest req;
  req.set_alias(alias);
  req.set_description("e2e key " + alias);
  if (encrypt_grant) req.add_encrypt_principals(kAppPrincipal);
  if (decrypt_grant) req.add_decrypt_principals(kAppPrincipal);
  pb::KeyMetadata key;
  grpc::Status status = server.Admin("officer1")->CreateKey(Context().get(), req, &key);
  INFO(status.error_message());
  REQUIRE(status.ok());
  return key;
}

// The whole catalogue as officer1 sees it, serialised: equal snapshots mean nothing changed.
inline std::string CatalogSnapshot(CustosServer& server) {
  std::string snapshot;
  pb::ListKeysRequest req;
  req.set_page_size(1000);
  auto admin = server.Admin("officer1");
  do {
    pb::ListKeysResponse page;
    grpc::Status status = admin->ListKeys(Context().get(), req, &page);
    REQUIRE(status.ok());
    snapshot += page.SerializeAsString();
    req.set_page_token(page.next_page_token());
  } while (!req.page_token().empty());
  return snapshot;
}

// Unique aliases across test cases sharing one server.
inline std::string UniqueAlias(const std::string& stem) {
  static int counter = 0;
  return "e2e/" + stem + "-" + std::to_string(++counter);
}

}  // namespace custos::testing
