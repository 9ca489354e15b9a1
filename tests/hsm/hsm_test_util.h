// Helpers shared by the hsm/ tests: options for a SoftHSM2 test token, opening an Hsm on it,
// and byte/string conversions.
#pragma once

#include <catch2/catch.hpp>

#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "common/secure_bytes.h"
#include "hsm/hsm.h"
#include "hsm/pkcs11_hsm.h"
#include "tests/support/softhsm_token.h"

namespace custos::testing {

inline hsm::Pkcs11Options OptionsFor(const SoftHsmToken& token, size_t pool_size = 4,
                                     size_t cache_capacity = 64) {
  hsm::Pkcs11Options options;
  options.module_path = kSoftHsmModule;
  options.token_label = token.label();
  options.pin = SecureBytes::FromString(token.pin());
  options.session_pool_size = pool_size;
  options.key_cache_capacity = cache_capacity;
  return options;
}

// The root key label OpenHsm() makes sure of.
inline constexpr char kRoot[] = "custos-root";

// Opens an Hsm on `token`, creating root key kRoot unless the token has one.
inline std::unique_ptr<hsm::Hsm> OpenHsm(const SoftHsmToken& token, size_t pool_size = 4,
                                         size_t cache_capacity = 64) {
  auto opened = hsm::OpenPkcs11Hsm(OptionsFor(token, pool_size, cache_capacity));
  REQUIRE(opened.ok());
  std::unique_ptr<hsm::Hsm> hsm = std::move(opened).value();
  absl::Status root = hsm->CreateRootKey(kRoot);
  REQUIRE((root.ok() || absl::IsAlreadyExists(root)));
  return hsm;
}

inline std::span<const uint8_t> AsBytes(std::string_view s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

inline std::string AsString(const SecureBytes& bytes) { return std::string(bytes.view()); }

}  // namespace custos::testing
