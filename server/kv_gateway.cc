#include "server/kv_gateway.h"

#include <httplib.h>
#include <openssl/crypto.h>
#include <openssl/ssl.h>

#include <charconv>
#include <optional>

#include "common/strings.h"
#include "spdlog/spdlog.h"

namespace custos::server {
namespace {

// TLS 1.2 with forward-secret AEAD suites only (TLS 1.3's are all AEAD), as the gRPC listener.
constexpr char kTls12Ciphers[] =
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256";
constexpr char kMountPattern[] = "([A-Za-z0-9_.-]{1,64})";
// Requests are GETs: anything with a body is refused before it is read.
constexpr size_t kMaxPayloadBytes = 4096;

// A whole decimal number 1..2^32-1, or nullopt.
std::optional<uint32_t> ParsePositive(std::string_view text) {
  uint32_t value = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc() || end != text.data() + text.size() || value == 0) return std::nullopt;
  return value;
}

void Reply(httplib::Response& response, int status, const std::string& json) {
  response.status = status;
  response.set_content(json, "application/json");
}

// Vault's error shape; never more than the status says.
void ReplyError(httplib::Response& response, int status, std::string_view why) {
  Reply(response, status, why.empty() ? "{\"errors\":[]}" : StrCat("{\"errors\":[\"", why, "\"]}"));
}

int HttpStatusOf(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kPermissionDenied:
      return 403;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kInvalidArgument:
      return 400;
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kResourceExhausted:
      return 503;
    default:
      return 500;
  }
}

// The key fetch: GET /v1/<mount>/data/<key id>[?version=<n>].
void FetchKey(core::Kms& kms, const httplib::Request& request, httplib::Response& response) {
  const std::string mount = request.matches[1];
  const std::optional<uint32_t> key_id = ParsePositive(std::string(request.matches[2]));
  std::optional<uint32_t> version;
  if (request.has_param("version")) {
    version = ParsePositive(request.get_param_value("version"));
    if (!version) return ReplyError(response, 400, "version must be a whole number from 1");
  }
  if (!key_id) return ReplyError(response, 404, "");
  // Named as gRPC names peers, for the audit log.
  const std::string peer = request.remote_addr.find(':') == std::string::npos
                               ? StrCat("ipv4:", request.remote_addr, ":", request.remote_port)
                               : StrCat("ipv6:[", request.remote_addr, "]:", request.remote_port);
  absl::StatusOr<core::Kms::TdeKey> key =
      kms.FetchTdeKey(peer, request.get_header_value("X-Vault-Token"), mount, *key_id, version);
  if (!key.ok()) {
    const int status = HttpStatusOf(key.status());
    // The reason stays in custosd's log and audit record: a client learns only the status.
    if (status >= 500) spdlog::warn("gateway: {}", key.status().ToString());
    return ReplyError(response, status, status == 403 ? "permission denied" : "");
  }
  // The key's hex is in the response body, a buffer cpp-httplib owns and frees unwiped (as
  // gRPC's reply buffers); the copies made here are wiped.
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex(2 * key->key.size(), '\0');
  for (size_t i = 0; i < key->key.size(); ++i) {
    hex[2 * i] = kHex[key->key.data()[i] >> 4];
    hex[2 * i + 1] = kHex[key->key.data()[i] & 0x0f];
  }
  std::string body = StrCat("{\"data\":{\"data\":{\"data\":\"", hex,
                            "\"},\"metadata\":{\"version\":", key->version, "}}}");
  Reply(response, 200, body);
  OPENSSL_cleanse(hex.data(), hex.size());
  OPENSSL_cleanse(body.data(), body.size());
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvGateway>> KvGateway::Start(core::Kms* kms,
                                                            const std::string& listen,
                                                            const std::string& cert,
                                                            const std::string& key) {
  const size_t colon = listen.rfind(':');
  const std::optional<uint32_t> port = colon == std::string::npos ? std::nullopt
                                       : listen.substr(colon + 1) == "0"
                                           ? std::optional<uint32_t>(0)
                                           : ParsePositive(listen.substr(colon + 1));
  if (!port || *port > 65535) {
    return absl::InvalidArgumentError(
        StrCat("config: gateway.listen must be host:port, not '", listen, "'"));
  }
  const std::string host = listen.substr(0, colon);
  std::string tls_error;
  auto gateway = std::unique_ptr<KvGateway>(new KvGateway());
  gateway->server_ = std::make_unique<httplib::SSLServer>([&](SSL_CTX& ctx) {
    const bool ok = SSL_CTX_set_min_proto_version(&ctx, TLS1_2_VERSION) == 1 &&
                    SSL_CTX_set_cipher_list(&ctx, kTls12Ciphers) == 1 &&
                    SSL_CTX_use_certificate_chain_file(&ctx, cert.c_str()) == 1 &&
                    SSL_CTX_use_PrivateKey_file(&ctx, key.c_str(), SSL_FILETYPE_PEM) == 1 &&
                    SSL_CTX_check_private_key(&ctx) == 1;
    if (!ok) tls_error = StrCat("cannot set up TLS with ", cert, " and ", key);
    SSL_CTX_set_options(
        &ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_NO_COMPRESSION);
    return ok;
  });
  if (!gateway->server_->is_valid()) {
    return absl::InvalidArgumentError(StrCat("gateway: ", tls_error));
  }
  httplib::SSLServer& server = *gateway->server_;
  server.set_payload_max_length(kMaxPayloadBytes);
  server.set_read_timeout(10, 0);
  server.set_write_timeout(10, 0);
  server.set_keep_alive_timeout(5);
  server.Get(StrCat("/v1/sys/mounts/", kMountPattern, "/tune"), [](const httplib::Request&,
                                                                   httplib::Response& response) {
    Reply(response, 200, R"({"data":{"options":{"version":"2"}},"options":{"version":"2"}})");
  });
  server.Get(StrCat("/v1/", kMountPattern, "/data/([0-9]{1,10})"),
             [kms](const httplib::Request& request, httplib::Response& response) {
               FetchKey(*kms, request, response);
             });
  // Unmatched requests: cpp-httplib answers 404 (or 400) with an empty body.
  gateway->port_ =
      *port == 0
          ? server.bind_to_any_port(host)
          : (server.bind_to_port(host, static_cast<int>(*port)) ? static_cast<int>(*port) : -1);
  if (gateway->port_ <= 0) {
    return absl::UnavailableError(StrCat("gateway: cannot listen on ", listen));
  }
  gateway->thread_ = std::thread([&server] { server.listen_after_bind(); });
  return gateway;
}

KvGateway::~KvGateway() {
  if (server_) server_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace custos::server
