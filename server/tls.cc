#include "server/tls.h"

#include <openssl/pem.h>
#include <openssl/x509.h>
#include <sys/stat.h>
#include <unistd.h>

#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>
#include <openssl/err.h>

#include <memory>
#include <type_traits>

#include "common/strings.h"

namespace custos::server {
namespace {

constexpr unsigned kRefreshSeconds = 300;

absl::Status CheckReadable(const std::string& path, std::string_view what) {
  if (access(path.c_str(), R_OK) == 0) return absl::OkStatus();
  return absl::FailedPreconditionError(StrCat("cannot read ", what, " ", path));
}

// The PEM items of `path`, read by `read` one after another; FAILED_PRECONDITION naming the
// setting unless there is at least one. `use` sees each.
template <typename T, typename Read, typename Free, typename Use>
absl::Status ReadPem(const std::string& path, std::string_view setting, Read read, Free free,
                     Use use) {
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new_file(path.c_str(), "r"), BIO_free);
  if (!bio) return absl::FailedPreconditionError(StrCat("cannot read ", setting, " ", path));
  size_t count = 0;
  // A key under a passphrase is refused, never prompted for on a terminal.
  pem_password_cb* no_passphrase = [](char*, int, int, void*) { return -1; };
  while (T* item = read(bio.get(), nullptr, no_passphrase, nullptr)) {
    ++count;
    use(item);
    free(item);
  }
  ERR_clear_error();  // the end of the file reads as an error
  if (count == 0) {
    return absl::FailedPreconditionError(StrCat(setting, " ", path, " holds no PEM ",
                                                std::is_same_v<T, X509> ? "certificate" : "key"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckTlsFiles(const Config& config) {
  CUSTOS_RETURN_IF_ERROR(CheckReadable(config.tls_cert, "tls.cert"));
  CUSTOS_RETURN_IF_ERROR(CheckReadable(config.tls_key, "tls.key"));
  CUSTOS_RETURN_IF_ERROR(CheckPrivateKeyFile(config.tls_key, "tls.key"));
  CUSTOS_RETURN_IF_ERROR(CheckReadable(config.client_ca, "tls.client_ca"));
  std::unique_ptr<X509, decltype(&X509_free)> leaf(nullptr, X509_free);
  CUSTOS_RETURN_IF_ERROR(
      ReadPem<X509>(config.tls_cert, "tls.cert", PEM_read_bio_X509, X509_free, [&leaf](X509* cert) {
        if (!leaf) leaf.reset(X509_dup(cert));
      }));
  bool matches = false;
  CUSTOS_RETURN_IF_ERROR(ReadPem<EVP_PKEY>(
      config.tls_key, "tls.key", PEM_read_bio_PrivateKey, EVP_PKEY_free,
      [&](EVP_PKEY* key) { matches = matches || X509_check_private_key(leaf.get(), key) == 1; }));
  ERR_clear_error();
  if (!matches) {
    return absl::FailedPreconditionError(
        StrCat("tls.key ", config.tls_key, " is not the key of tls.cert ", config.tls_cert));
  }
  return ReadPem<X509>(config.client_ca, "tls.client_ca", PEM_read_bio_X509, X509_free,
                       [](X509*) {});
}

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
  CUSTOS_RETURN_IF_ERROR(CheckTlsFiles(config));
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
