// HsmRowAuthenticator: the catalogue rows' MACs (storage/row_integrity.h), computed in the HSM
// with an HMAC-SHA256 key of their own (custos-catalog-hmac) that never leaves it. A key of its
// own, not the audit log's context key: context HMACs are published in the audit log, and a
// context chosen to encode like a row must never yield that row's MAC.
//
// The store is opened (and locked) before the HSM, so the HSM is bound afterwards; until then
// Mac() is UNAVAILABLE. Thread-safe once bound.
#pragma once

#include <atomic>
#include <span>
#include <string>

#include "hsm/hsm.h"
#include "storage/key_store.h"

namespace custos::core {

class HsmRowAuthenticator final : public storage::RowAuthenticator {
 public:
  explicit HsmRowAuthenticator(std::string key_label) : key_label_(std::move(key_label)) {}

  // `hsm` must outlive every later Mac() call.
  void Bind(hsm::Hsm* hsm) { hsm_.store(hsm); }

  absl::StatusOr<Bytes> Mac(std::span<const uint8_t> canonical) override {
    hsm::Hsm* hsm = hsm_.load();
    if (hsm == nullptr)
      return absl::UnavailableError("the catalogue's HSM key is not reachable yet");
    return hsm->HmacSha256(key_label_, canonical);
  }

 private:
  const std::string key_label_;
  std::atomic<hsm::Hsm*> hsm_{nullptr};
};

}  // namespace custos::core
