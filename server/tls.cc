#include "server/tls.h"

#include <unistd.h>

#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>

#include "common/strings.h"

namespace custos::server {
namespace {

constexpr unsigned kRefreshSeconds = 300;

absl::Status CheckReadable(const std::string& path, std::string_view what) {
  if (access(path.c_str(), R_OK) == 0) return absl::OkStatus();
  return absl::FailedPreconditionError(StrCat("cannot read ", what, " ", path));
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MutualTlsCredentials(
    const Config& config) {
  CUSTOS_RETURN_IF_ERROR(CheckReadable(config.tls_cert, "tls.cert"));
  CUSTOS_RETURN_IF_ERROR(CheckReadable(config.tls_key, "tls.key"));
  CUSTOS_RETURN_IF_ERROR(CheckReadable(config.client_ca, "tls.client_ca"));
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      config.tls_key, config.tls_cert, config.client_ca, kRefreshSeconds);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  if (!config.crl_dir.empty()) options.set_crl_directory(config.crl_dir);
  return grpc::experimental::TlsServerCredentials(options);
}

}  // namespace custos::server
