// KvGateway: the key/value gateway, a second front door to core/ for databases (docs/TDE.md).
//
// It answers, over HTTPS, exactly what a HashiCorp-Vault key/value (version 2) client such as
// MariaDB's hashicorp_key_management plugin sends:
//   GET /v1/<mount>/data/<key id>[?version=<n>]   with X-Vault-Token: <token>
//       200 {"data":{"data":{"data":"<key as hex>"},"metadata":{"version":<n>}}}
//       403 for a missing, wrong, revoked or expired token; 404 for what does not exist or
//       what the token is not bound to (Kms::FetchTdeKey decides, and records the call).
//   GET /v1/sys/mounts/<mount>/tune
//       200 {"options":{"version":"2"}}, the same for every mount name, token or not: it
//       tells nothing, and lets the plugin's start-up check pass.
// Anything else is 404 (400 for what cpp-httplib cannot parse); it never redirects (a client
// following a redirect would forward its token). Built on cpp-httplib (Debian's 0.11.4), with
// TLS 1.2 or later and AEAD suites only, the certificate and key of the gRPC listener; no
// client certificate is asked for (the token authenticates).
//
// cpp-httplib serves each connection on one thread, bounded per read (not per request) by
// timeouts, and bounds each header line but not their number: a client that trickles bytes
// would hold its thread, one that sends header lines without end would grow custosd's memory.
// So connections run on a pool of 16 threads with at most 64 waiting (beyond, the kernel's
// accept backlog holds them), and each is cut (its socket shut down and reset) when:
//   - it has sent over 32 KiB of request (counted per TLS record by an SSL_CTX message
//     callback, before cpp-httplib stores the headers; nothing more is read from it);
//   - its request has not all arrived 3 s after its handshake began (1 s while connections
//     wait for a thread), or it is open past 10 s, its time inside Kms not counted (a
//     watchdog; the HSM's deadline bounds a call);
//   - while the pool is full, its address (IPv4, or IPv6 /64) has more than
//     Options::connections_per_address connections served at once: the oldest of them still
//     waiting for its request goes, so a client displaces its own stalled connections.
// Cuts are counted and logged, one line per 10 s at most (and at stop), never under the lock
// connections wait on. Stopping never waits long on a client: calls inside Kms are waited for
// (each bounded by the HSM deadline), and the keys they fetched for up to 2 s to be written;
// then every other open connection is cut and every one still waiting for a thread as it gets
// one, and a thread still not done after a grace period is abandoned with the server object (it
// no longer touches Kms). Keep the listener reachable from database hosts only (docs/TDE.md).
//
// Thread-safe; the Kms must outlive it.
#pragma once

#include <sys/socket.h>

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "common/metrics.h"
#include "common/status.h"
#include "core/kms.h"

namespace httplib {
class SSLServer;
struct Request;
struct Response;
}  // namespace httplib

namespace custos::server {

// A client's address as the gateway counts connections per address: an IPv4 address (also one
// mapped into IPv6 by a dual-stack listener, "::ffff:a.b.c.d"), or an IPv6 /64 ("2001:db8::/64":
// one host or one site's network may hold all of one); "" for any other family.
std::string AddressGroup(const sockaddr_storage& peer);

// Zeroes the values of `request`'s X-Vault-Token headers, in place. cpp-httplib hands its
// handlers a const Request, but the object is its own, not const.
void WipeTokens(const httplib::Request& request);

// Answers 200 with `body`, a JSON text that holds a key. cpp-httplib writes it to TLS straight
// from one buffer, wiped when `response` is destroyed. (A body given by set_content would be
// copied for a Range request, compressed for an Accept-Encoding one, and freed unwiped.) A range
// past the body is written as nothing, and fails the write. `released`, if given, runs once the
// buffer is wiped, told whether cpp-httplib wrote the body whole.
void ReplySecret(httplib::Response& response, std::string body,
                 std::function<void(bool written)> released = nullptr);

class KvGateway {
 public:
  struct Options {
    std::string listen;  // "host:port"; port 0 picks one
    std::string cert;    // PEM chain
    std::string key;     // PEM private key
    // Connections from one client address (an IPv4 address or an IPv6 /64) served at once
    // while every thread is busy; 0: no such limit (gateway.connections_per_address).
    size_t connections_per_address = 8;
  };
  // Listens as `options` say; counts the connections it cuts in `registry` if given (which
  // must outlive it).
  static absl::StatusOr<std::unique_ptr<KvGateway>> Start(core::Kms* kms, const Options& options,
                                                          metrics::Registry* registry = nullptr);
  ~KvGateway();  // stops listening and waits for calls in progress

  int port() const { return port_; }

  // What the handlers share with the gateway; outlives it while abandoned threads run.
  struct State;

 private:
  KvGateway() = default;

  std::shared_ptr<State> state_;
  std::unique_ptr<httplib::SSLServer> server_;
  std::thread thread_;    // runs the accept loop
  std::thread watchdog_;  // cuts connections open past their deadline
  int port_ = 0;
};

}  // namespace custos::server
