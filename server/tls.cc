#include "server/tls.h"

#include <sys/stat.h>
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

absl::Status CheckPrivateKeyFile(const std::string& path, std::string_view setting) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) {
    return absl::FailedPreconditionError(StrCat("cannot read ", setting, " ", path));
  }
  if (!S_ISREG(st.st_mode) || (st.st_mode & 077) != 0 || st.st_uid != geteuid()) {
    return absl::PermissionDeniedError(StrCat("private key file ", path, " (", setting,
                                              ") must be a file of this user with mode 0600"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MutualTlsCredentials(
    const Config& config, PeerAuthenticator& authenticator) {
  CUSTOS_RETURN_IF_ERROR(CheckReadable(config.tls_cert, "tls.cert"));
  CUSTOS_RETURN_IF_ERROR(CheckReadable(config.tls_key, "tls.key"));
  CUSTOS_RETURN_IF_ERROR(CheckPrivateKeyFile(config.tls_key, "tls.key"));
  CUSTOS_RETURN_IF_ERROR(CheckReadable(config.client_ca, "tls.client_ca"));
  // Fail closed before serving: without a current CRL for every client CA, custosd does not
  // start (gRPC alone would accept every certificate of a CA whose CRL is missing).
  CUSTOS_RETURN_IF_ERROR(
      authenticator.LoadRevocationList(config.client_ca, config.crl_dir).status());
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      config.tls_key, config.tls_cert, config.client_ca, kRefreshSeconds);
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_root_certs();
  options.watch_identity_key_cert_pairs();
  options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  // gRPC's own check at the handshake stays, as a first line: it refuses a certificate on a
  // CRL it has seen. The per-call check (PeerAuthenticator) is the one that fails closed.
  if (!config.crl_dir.empty()) options.set_crl_directory(config.crl_dir);
  return grpc::experimental::TlsServerCredentials(options);
}

absl::StatusOr<std::string> ReloadClientCrls(const Config& config,
                                             PeerAuthenticator& authenticator) {
  return authenticator.LoadRevocationList(config.client_ca, config.crl_dir);
}

absl::Status LimitConnectionAge(grpc::ServerBuilder& builder, int max_age_seconds) {
  if (max_age_seconds < 1 || max_age_seconds > kMaxConnectionAgeLimitSeconds) {
    return absl::InvalidArgumentError(
        StrCat("tls.max_connection_age_seconds must be 1..", kMaxConnectionAgeLimitSeconds));
  }
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, max_age_seconds * 1000);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
                             kConnectionAgeGraceSeconds * 1000);
  return absl::OkStatus();
}

}  // namespace custos::server
