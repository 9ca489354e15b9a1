// The caller's identity from a client certificate (server/peer_identity.h) over arbitrary
// bytes. An input that starts with "-----BEGIN" is used as PEM as it is; any other is taken as
// DER and wrapped in a PEM block first, so the fuzzer mutates the certificate's structure rather
// than its base64. Nothing may escape as a sanitizer report, a refusal is INVALID_ARGUMENT
// (UNAUTHENTICATED from the authenticator), and a principal that is accepted has the shape the
// header promises: printable ASCII, and either a URI with a scheme or a CN without ':'.
#include <openssl/evp.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/clock.h"
#include "fuzz/fuzz_check.h"
#include "server/peer_identity.h"

namespace custos::server {
namespace {

std::string DerToPem(std::string_view der) {
  std::string base64(4 * ((der.size() + 2) / 3) + 1, '\0');
  const int n = EVP_EncodeBlock(reinterpret_cast<unsigned char*>(base64.data()),
                                reinterpret_cast<const unsigned char*>(der.data()),
                                static_cast<int>(der.size()));
  base64.resize(static_cast<size_t>(n));
  std::string pem = "-----BEGIN CERTIFICATE-----\n";
  for (size_t i = 0; i < base64.size(); i += 64) pem += base64.substr(i, 64) + "\n";
  return pem + "-----END CERTIFICATE-----\n";
}

bool IsSchemeChar(char c, bool first) {
  const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
  return first ? alpha : alpha || (c >= '0' && c <= '9') || c == '+' || c == '-' || c == '.';
}

void CheckPrincipal(const std::string& principal) {
  FUZZ_CHECK(!principal.empty());
  for (unsigned char c : principal) FUZZ_CHECK(c >= 0x21 && c <= 0x7e);
  const size_t colon = principal.find(':');
  if (colon == std::string::npos) return;  // a CN principal
  FUZZ_CHECK(colon > 0 && colon + 1 < principal.size());
  for (size_t i = 0; i < colon; ++i) FUZZ_CHECK(IsSchemeChar(principal[i], i == 0));
}

}  // namespace
}  // namespace custos::server

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace custos::server;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const std::string pem = input.starts_with("-----BEGIN") ? std::string(input) : DerToPem(input);

  const absl::StatusOr<PeerCertificate> cert = ParsePeerCertificate(pem);
  const std::string fingerprint = CertificateSha256(pem);
  FUZZ_CHECK(fingerprint.empty() || fingerprint.size() == 64);
  static const custos::ManualClock any_time(1'700'000'000);
  if (!cert.ok()) {
    FUZZ_CHECK(cert.status().code() == absl::StatusCode::kInvalidArgument);
    const absl::StatusOr<std::string> caller = PeerAuthenticator(&any_time, 4).Authenticate(pem);
    FUZZ_CHECK(!caller.ok() && caller.status().code() == absl::StatusCode::kUnauthenticated);
    return 0;
  }
  CheckPrincipal(cert->principal);
  FUZZ_CHECK(cert->sha256 == fingerprint && !fingerprint.empty());
  FUZZ_CHECK(!cert->serial.empty() && !cert->issuer_der.empty());
  const absl::StatusOr<std::string> principal = PrincipalFromPem(pem);
  FUZZ_CHECK(principal.ok() && *principal == cert->principal);
  // With no CRLs set, a call is accepted exactly when the clock is inside the validity period.
  for (const int64_t now : {cert->not_before, cert->not_after, cert->not_after + 1}) {
    const custos::ManualClock clock(now);
    const absl::StatusOr<std::string> caller = PeerAuthenticator(&clock, 4).Authenticate(pem);
    FUZZ_CHECK(caller.ok() == (cert->not_before <= now && now <= cert->not_after));
    FUZZ_CHECK(caller.ok() ? *caller == cert->principal
                           : caller.status().code() == absl::StatusCode::kUnauthenticated);
  }
  return 0;
}
