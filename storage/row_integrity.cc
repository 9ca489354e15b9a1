#include "storage/row_integrity.h"

#include <openssl/crypto.h>

#include "absl/strings/cord.h"
#include "common/strings.h"
#include "storage/row_codec.h"

namespace custos::storage {

absl::StatusOr<Bytes> RowIntegrity::Seal(std::span<const uint8_t> canonical) const {
  if (authenticator_ == nullptr) return Bytes();
  absl::StatusOr<Bytes> mac = authenticator_->Mac(canonical);
  if (mac.ok()) return mac;
  // Whatever the HSM said, nothing was written and a retry may succeed.
  absl::Status failed(absl::StatusCode::kUnavailable,
                      StrCat("a row could not be sealed: ", mac.status().message()));
  mac.status().ForEachPayload(
      [&](absl::string_view url, const absl::Cord& payload) { failed.SetPayload(url, payload); });
  failed.SetPayload(kSealPayload, absl::Cord());
  return failed;
}

absl::Status RowIntegrity::Known(const std::string& name) const {
  std::lock_guard lock(mu_);
  auto it = refused_.find(name);
  return it == refused_.end() ? absl::OkStatus() : it->second;
}

absl::Status RowIntegrity::Check(const std::string& name, std::span<const uint8_t> canonical,
                                 std::span<const uint8_t> mac,
                                 const std::optional<RowRecord>& recorded, Chain chain,
                                 bool mac_verified) {
  if (authenticator_ == nullptr) return absl::OkStatus();
  CUSTOS_RETURN_IF_ERROR(Known(name));
  if (chain == Chain::kRecordedIfUsed && !recorded.has_value() && mac.empty()) {
    return absl::OkStatus();  // the caller checked there is nothing to guard in it
  }
  if (mac.empty() && unsealed_catalog_) return absl::OkStatus();  // sealed at start-up
  if (mac.empty()) return Refuse(name, "it carries no MAC (written outside Custos?)");
  if (!mac_verified) {
    CUSTOS_ASSIGN_OR_RETURN(const Bytes expected, authenticator_->Mac(canonical));
    if (expected.size() != mac.size() ||
        CRYPTO_memcmp(expected.data(), mac.data(), mac.size()) != 0) {
      return Refuse(name, "its MAC does not match its content (changed outside Custos)");
    }
  }
  if (chain == Chain::kMacOnly) return absl::OkStatus();
  if (!recorded.has_value()) {
    return Refuse(name, "no audit record names it (written outside Custos?)");
  }
  if (recorded->digest != RowDigest(canonical)) {
    return Refuse(name,
                  "it is not the version the audit log last recorded (an older copy put back?)");
  }
  absl::Status covered = trust_->Cover(recorded->seq);
  if (absl::IsFailedPrecondition(covered)) {
    return Refuse(name, StrCat("the audit record that vouches for it (", recorded->seq,
                               ") is in a part of the log changed after it was written: ",
                               covered.message()));
  }
  return covered;
}

absl::Status RowIntegrity::Refuse(const std::string& name, std::string_view why) {
  absl::Status refusal = absl::DataLossError(
      StrCat("catalogue row ", name, " failed its integrity check: ", why,
             "; it is not used until an operator restores it from a backup of this state"));
  refusal.SetPayload(kIntegrityPayload, absl::Cord(name));
  std::lock_guard lock(mu_);
  refused_.emplace(name, refusal);
  return refusal;
}

}  // namespace custos::storage
