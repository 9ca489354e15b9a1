#include "server/kv_gateway.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <httplib.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <regex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/secure_bytes.h"
#include "common/strings.h"
#include "server/config.h"
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
// Connections served at once, and waiting for a thread (then the accept loop waits).
constexpr size_t kThreads = 16;
constexpr size_t kQueued = 64;
// How long stopping waits for open connections before abandoning them.
constexpr auto kStopGrace = std::chrono::seconds(2);
// A connection open this long, its time inside Kms not counted, is cut (a client that trickles
// bytes would otherwise hold its thread for as long as it likes: cpp-httplib bounds each read,
// not the request). A call inside Kms is bounded by the HSM's deadline (hsm.call_timeout_ms, up
// to 60 s) instead. The plugin's requests take milliseconds.
constexpr auto kConnectionDeadline = std::chrono::seconds(10);
// A connection whose request (line and headers) has not all arrived this long after its TLS
// handshake began is cut: a slow client holds a thread for this long, not kConnectionDeadline;
// and for 1 s only while other connections wait for a thread (clients from many addresses).
constexpr auto kRequestDeadline = std::chrono::seconds(3);
constexpr auto kRequestDeadlineWhenBusy = std::chrono::seconds(1);
// Request bytes (TLS application data) read on one connection before it is cut. cpp-httplib
// bounds each header line (8 KiB) but not their number, and keeps them all in memory: endless
// short header lines within the deadlines took hundreds of MB. The plugin sends under 1 KiB.
constexpr size_t kMaxRequestBytes = size_t{32} * 1024;
// How often the watchdog runs, and at most how often it logs the connections it and the other
// bounds cut.
constexpr auto kWatchdogTick = std::chrono::milliseconds(250);
constexpr auto kCutLogInterval = std::chrono::seconds(10);
// Reasons of failed fetches remembered for coalescing their log lines (State::NoteFailure).
constexpr size_t kMaxFailureReasons = 64;

// A whole decimal number 1..2^32-1 in its one spelling (no leading zero: "01" would name key 1
// under a second path), or nullopt.
std::optional<uint32_t> ParsePositive(std::string_view text) {
  if (text.empty() || text.front() == '0') return std::nullopt;
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

}  // namespace

struct KvGateway::State {
  explicit State(core::Kms* k) : kms(k) {}
  core::Kms* const kms;
  std::mutex mu;
  std::condition_variable changed;
  bool closing = false;  // once set, no handler calls kms
  // Set as the listener stops: the accept loop must not wait for room in the queue then.
  bool listener_stopping = false;
  // Set once stopping has waited for the calls inside Kms and shut every connection: the
  // pool's grace for its threads starts then, not while the HSM is waited for.
  bool connections_shut = false;
  size_t in_kms = 0;  // handlers inside kms now
  // Keys fetched and not yet sent (their responses not yet destroyed): stopping the listener
  // would cut them, as cpp-httplib writes no more of a provided body once it stops.
  size_t replying = 0;
  size_t busy = 0;  // pool threads serving a connection now
  // The pool's queue and stop flag (the pool object itself is cpp-httplib's to delete).
  std::deque<std::function<void()>> jobs;
  bool pool_stopping = false;
  // The connection each pool thread serves now, from its TLS handshake until its job is done:
  // what the watchdog and stopping cut.
  struct Connection {
    // A duplicate of its socket's descriptor, closed when the entry goes: cpp-httplib closes
    // its own before then, and that number may already name another file or connection.
    int fd = -1;
    std::chrono::steady_clock::time_point since;
    // Since when kConnectionDeadline counts: `since`, then the end of its call into Kms.
    std::chrono::steady_clock::time_point client_since;
    std::string address;        // the client's, as ClientAddress names it
    bool request_read = false;  // its request line and headers have all arrived
    bool in_kms = false;
    bool cut = false;
    // Its key was written to the socket: stopping leaves it to cpp-httplib to close, rather
    // than reset it and drop what the client has not acknowledged yet.
    bool replied = false;
  };
  std::map<std::thread::id, Connection> connections;
  bool watchdog_stopping = false;
  // Connections from one client address served at once while the pool is full (0: no limit).
  size_t per_address = 0;

  // Connections cut since the last log line about them, by why, and the last client cut; and
  // the metric counting them all (null without a registry).
  enum Why { kBusyAddress, kLongRequest, kSlowRequest, kOpenTooLong, kNoDescriptor, kWhyCount };
  struct Cuts {
    size_t count[kWhyCount] = {};
    std::string last_address;
  };
  Cuts cuts;
  metrics::Counter* cut_total[kWhyCount] = {};
  std::chrono::steady_clock::time_point last_cut_log;

  // Shuts down (both ways) the socket of `connection`, so that its thread's reads and writes
  // fail and the connection ends, reset when its thread closes it (so the client learns at
  // once, and no orphan socket lingers in the kernel). With mu held.
  static void Shut(Connection& connection) {
    if (connection.cut) return;
    const linger reset{1, 0};
    setsockopt(connection.fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
    ::shutdown(connection.fd, SHUT_RDWR);
    connection.cut = true;
  }

  // The connection the calling pool thread serves, or null. With mu held.
  Connection* Served() {
    const auto served = connections.find(std::this_thread::get_id());
    return served == connections.end() ? nullptr : &served->second;
  }

  // Counts a cut of `why` of a connection from `address`. With mu held.
  void Count(Why why, const std::string& address) {
    ++cuts.count[why];
    if (cut_total[why] != nullptr) cut_total[why]->Add();
    cuts.last_address = address;
  }

  // Shut and counted. With mu held.
  void Cut(Connection& connection, Why why) {
    if (connection.cut) return;
    Shut(connection);
    Count(why, connection.address);
  }

  // While the pool is full (every thread serving, or connections waiting for one), cuts from
  // each address over per_address its oldest connections still waiting for their request (a
  // client's new connection displaces its own stalled ones, not a request being answered).
  // With mu held.
  void TrimAddresses() {
    if (per_address == 0 || (busy < kThreads && jobs.empty())) return;
    std::map<std::string_view, std::vector<Connection*>> by_address;
    for (auto& [thread, connection] : connections) {
      if (!connection.cut) by_address[connection.address].push_back(&connection);
    }
    for (auto& [address, served] : by_address) {
      if (served.size() <= per_address) continue;
      std::sort(served.begin(), served.end(),
                [](const Connection* a, const Connection* b) { return a->since < b->since; });
      size_t over = served.size() - per_address;
      for (auto it = served.begin(); over > 0 && it != served.end(); ++it) {
        if ((*it)->request_read) continue;
        Cut(**it, kBusyAddress);
        --over;
      }
    }
  }

  // Cuts the connections open past kConnectionDeadline (outside Kms), and those whose request
  // has not all arrived by its deadline. With mu held.
  void CutOverdue() {
    const auto now = std::chrono::steady_clock::now();
    const auto request_deadline = jobs.empty() ? kRequestDeadline : kRequestDeadlineWhenBusy;
    for (auto& [thread, connection] : connections) {
      if (!connection.in_kms && now - connection.client_since >= kConnectionDeadline) {
        Cut(connection, kOpenTooLong);
      } else if (!connection.request_read && now - connection.since >= request_deadline) {
        Cut(connection, kSlowRequest);
      }
    }
  }

  // Fetches answered 5xx (the HSM or the audit log down, say), by the reason custosd logs:
  // when it last logged that reason, and how many more it held back since. An outage under
  // load is then a line per reason per kCutLogInterval, not one per fetch; every fetch is
  // audited all the same.
  struct Failures {
    std::chrono::steady_clock::time_point logged;
    size_t held = 0;
  };
  std::map<std::string, Failures> failures;

  // True if a fetch that failed for `reason` is to be logged now: the first of its reason, or
  // one past the kMaxFailureReasons remembered; otherwise it is counted (TakeHeldFailures).
  // With mu held.
  bool NoteFailure(const std::string& reason) {
    const auto it = failures.find(reason);
    if (it != failures.end()) {
      ++it->second.held;
      return false;
    }
    if (failures.size() < kMaxFailureReasons) {
      failures.emplace(reason, Failures{std::chrono::steady_clock::now(), 0});
    }
    return true;
  }

  // The failures held back to log now, by reason (and forgets them): those of reasons logged
  // kCutLogInterval ago or more, or all of them (`now_or_never`). A reason with none held is
  // forgotten once its interval is over, so that its next failure is logged at once. With mu
  // held; the lines are written without.
  std::vector<std::pair<std::string, size_t>> TakeHeldFailures(bool now_or_never) {
    const auto now = std::chrono::steady_clock::now();
    std::vector<std::pair<std::string, size_t>> taken;
    for (auto it = failures.begin(); it != failures.end();) {
      if (!now_or_never && now - it->second.logged < kCutLogInterval) {
        ++it;
      } else if (it->second.held == 0) {
        it = failures.erase(it);
      } else {
        taken.emplace_back(it->first, std::exchange(it->second.held, 0));
        it->second.logged = now;
        ++it;
      }
    }
    return taken;
  }
  static void LogHeldFailures(const std::vector<std::pair<std::string, size_t>>& taken) {
    for (const auto& [reason, held] : taken) {
      spdlog::warn("gateway: {} more {} failed since this was last logged: {}", held,
                   held == 1 ? "fetch" : "fetches", reason);
    }
  }

  // The cuts to log now (and forgets them), if any and the last line is kCutLogInterval old or
  // `now_or_never`: a flood of them is one line, not one per connection. With mu held; the line
  // is written without (a stalled log sink must not stall every connection).
  std::optional<Cuts> TakeCuts(bool now_or_never) {
    const auto now = std::chrono::steady_clock::now();
    const size_t total = std::accumulate(std::begin(cuts.count), std::end(cuts.count), size_t{0});
    if (total == 0 || (!now_or_never && now - last_cut_log < kCutLogInterval)) return std::nullopt;
    last_cut_log = now;
    return std::exchange(cuts, Cuts{});
  }
  void LogCuts(const Cuts& taken) const {
    const auto seconds = [](auto duration) {
      return std::chrono::duration_cast<std::chrono::seconds>(duration).count();
    };
    spdlog::warn(
        "key/value gateway: cut {} connection(s) (the last from {}): {} to keep one address to "
        "{} at once, {} sending over {} bytes of request, {} without their request {} s after "
        "connecting ({} s while others wait for a thread), {} open past {} s, {} for want of a "
        "file descriptor",
        std::accumulate(std::begin(taken.count), std::end(taken.count), size_t{0}),
        taken.last_address, taken.count[kBusyAddress], per_address, taken.count[kLongRequest],
        kMaxRequestBytes, taken.count[kSlowRequest], seconds(kRequestDeadline),
        seconds(kRequestDeadlineWhenBusy), taken.count[kOpenTooLong], seconds(kConnectionDeadline),
        taken.count[kNoDescriptor]);
  }
};

std::string AddressGroup(const sockaddr_storage& peer) {
  char text[INET6_ADDRSTRLEN] = {};
  if (peer.ss_family == AF_INET) {
    const in_addr& address = reinterpret_cast<const sockaddr_in*>(&peer)->sin_addr;
    return inet_ntop(AF_INET, &address, text, sizeof(text)) != nullptr ? text : "";
  }
  if (peer.ss_family != AF_INET6) return "";
  in6_addr address = reinterpret_cast<const sockaddr_in6*>(&peer)->sin6_addr;
  if (IN6_IS_ADDR_V4MAPPED(&address)) {
    return inet_ntop(AF_INET, &address.s6_addr[12], text, sizeof(text)) != nullptr ? text : "";
  }
  std::fill(std::begin(address.s6_addr) + 8, std::end(address.s6_addr), 0);
  return inet_ntop(AF_INET6, &address, text, sizeof(text)) != nullptr ? StrCat(text, "/64") : "";
}

namespace {

// The state of the gateway whose pool thread this is (TLS handshakes run on pool threads).
thread_local KvGateway::State* serving_state = nullptr;
// Request bytes read on the connection this pool thread serves.
thread_local size_t request_bytes = 0;

// The client at the other end of `fd`, as connections are counted per address ("" if
// unknown).
std::string ClientAddress(int fd) {
  sockaddr_storage peer{};
  socklen_t size = sizeof(peer);
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &size) != 0) return "";
  return AddressGroup(peer);
}

// SSL_CTX info callback: a connection's handshake starts on a pool thread; its socket is noted
// (and shut at once when the gateway is stopping), and addresses over their limit are trimmed
// (TrimAddresses: only while the pool is full, so databases behind one address, NAT or a
// proxy, are never cut for it while threads are free).
void NoteConnection(const SSL* ssl, int where, int /*ret*/) {
  if ((where & SSL_CB_HANDSHAKE_START) == 0 || serving_state == nullptr) return;
  KvGateway::State& state = *serving_state;
  std::lock_guard lock(state.mu);
  // (Called again for later handshake messages of the same connection: noted once.)
  const auto [noted, added] =
      state.connections.try_emplace(std::this_thread::get_id(), KvGateway::State::Connection{});
  if (!added) return;
  KvGateway::State::Connection& connection = noted->second;
  request_bytes = 0;
  connection.since = connection.client_since = std::chrono::steady_clock::now();
  connection.fd = fcntl(SSL_get_fd(ssl), F_DUPFD_CLOEXEC, 0);
  if (connection.fd < 0) {  // out of descriptors: this connection cannot be watched
    ::shutdown(SSL_get_fd(ssl), SHUT_RDWR);
    connection.cut = true;
    state.Count(KvGateway::State::kNoDescriptor, ClientAddress(SSL_get_fd(ssl)));
    return;
  }
  connection.address = ClientAddress(connection.fd);
  if (state.closing) return KvGateway::State::Shut(connection);
  state.TrimAddresses();
}

// SSL_CTX message callback, on the pool thread reading: counts the request bytes each
// application-data record brings, and cuts the connection past kMaxRequestBytes. Shutting the
// socket down does not stop cpp-httplib from parsing what is already received (megabytes of a
// flood); marked as shut by the client, the TLS session returns nothing more, this record
// included.
void CountRequestBytes(int write_p, int /*version*/, int content_type, const void* buf, size_t len,
                       SSL* ssl, void* /*arg*/) {
  const auto* header = static_cast<const unsigned char*>(buf);
  if (write_p != 0 || content_type != SSL3_RT_HEADER || len < 5 ||
      header[0] != SSL3_RT_APPLICATION_DATA || serving_state == nullptr) {
    return;
  }
  request_bytes += (size_t{header[3]} << 8) | header[4];
  if (request_bytes <= kMaxRequestBytes) return;
  SSL_set_shutdown(ssl, SSL_get_shutdown(ssl) | SSL_RECEIVED_SHUTDOWN);
  std::lock_guard lock(serving_state->mu);
  if (KvGateway::State::Connection* connection = serving_state->Served()) {
    serving_state->Cut(*connection, KvGateway::State::kLongRequest);
  }
}

// cpp-httplib's TaskQueue with a bounded queue: enqueue (the accept loop) waits while kQueued
// connections wait for a thread. Its threads share State, so they may outlive the pool object
// (and the gateway) when stopping abandons them.
class BoundedPool final : public httplib::TaskQueue {
 public:
  explicit BoundedPool(std::shared_ptr<KvGateway::State> state) : state_(std::move(state)) {
    for (size_t i = 0; i < kThreads; ++i) {
      std::thread([state = state_] { Serve(*state); }).detach();
    }
  }
  void enqueue(std::function<void()> fn) override {
    std::unique_lock lock(state_->mu);
    // (At stop, room or not: the accept loop must get back to see that it stops.)
    state_->changed.wait(
        lock, [&] { return state_->jobs.size() < kQueued || state_->listener_stopping; });
    state_->jobs.push_back(std::move(fn));
    state_->changed.notify_all();
  }
  // Waits up to kStopGrace for the threads to finish what they serve; those still serving a
  // connection are left to it (State::busy says how many).
  void shutdown() override {
    std::unique_lock lock(state_->mu);
    state_->pool_stopping = true;
    state_->changed.notify_all();
    // (Ended by a failure rather than the stop: no wait for it.)
    state_->changed.wait(lock, [&] { return !state_->closing || state_->connections_shut; });
    state_->changed.wait_for(lock, kStopGrace,
                             [&] { return state_->busy == 0 && state_->jobs.empty(); });
  }

 private:
  static void Serve(KvGateway::State& state) {
    serving_state = &state;
    std::unique_lock lock(state.mu);
    for (;;) {
      state.changed.wait(lock, [&] { return !state.jobs.empty() || state.pool_stopping; });
      if (state.jobs.empty()) return;
      std::function<void()> job = std::move(state.jobs.front());
      state.jobs.pop_front();
      ++state.busy;
      state.changed.notify_all();  // room in the queue
      lock.unlock();
      job();  // serves the connection, then closes its socket
      lock.lock();
      const auto served = state.connections.find(std::this_thread::get_id());
      if (served != state.connections.end()) {
        close(served->second.fd);
        state.connections.erase(served);
      }
      --state.busy;
      state.changed.notify_all();
    }
  }

  std::shared_ptr<KvGateway::State> state_;
};

// Marks the connection this thread serves as inside Kms or not (its time inside is not counted
// against kConnectionDeadline). With mu held.
void SetInKms(KvGateway::State& state, bool in_kms) {
  KvGateway::State::Connection* connection = state.Served();
  if (connection == nullptr) return;
  connection->in_kms = in_kms;
  if (!in_kms) connection->client_since = std::chrono::steady_clock::now();
}

// Whether `request` says a body follows it (which cpp-httplib does not read for a GET).
bool CarriesBody(const httplib::Request& request) {
  return request.has_header("Transfer-Encoding") || request.has_header("Content-Encoding") ||
         (request.has_header("Content-Length") &&
          request.get_header_value("Content-Length") != "0");
}

// The key fetch: GET /v1/<mount>/data/<key id>[?version=<n>]. Every other request but the
// mount check comes here too (`key_fetch` false): the token is checked first, so that a bad
// one gets 403 whatever was asked, and each refusal is recorded, as any call's.
void FetchKey(KvGateway::State& state, const httplib::Request& request, httplib::Response& response,
              bool key_fetch) {
  std::string mount;
  std::optional<uint32_t> key_id;
  std::optional<uint32_t> version;
  absl::Status malformed;
  if (!key_fetch || request.method != "GET") {           // HEAD too: it fetches nothing
    malformed = absl::NotFoundError("not a key fetch");  // (no text of the client's)
  } else {
    mount = request.matches[1];
    key_id = ParsePositive(std::string(request.matches[2]));
    if (!key_id) malformed = absl::NotFoundError("key ids are whole numbers from 1");
    if (request.has_param("version")) {
      version = ParsePositive(request.get_param_value("version"));
      if (!version) malformed = absl::InvalidArgumentError("version must be a whole number from 1");
    }
    // cpp-httplib reads no body for a GET: refuse one rather than leave it unread.
    if (CarriesBody(request)) malformed = absl::InvalidArgumentError("a key fetch carries no body");
  }
  // Named as gRPC names peers, for the audit log, but without the port: HTTP clients open a
  // connection per request, and refusals are coalesced per peer.
  // A dual-stack listener's IPv4 client (::ffff:a.b.c.d) is named as the IPv4 address it is.
  std::string_view remote = request.remote_addr;
  if (remote.rfind("::ffff:", 0) == 0 && remote.find('.') != std::string_view::npos) {
    remote.remove_prefix(7);
  }
  const std::string peer = remote.find(':') == std::string_view::npos
                               ? StrCat("ipv4:", remote)
                               : StrCat("ipv6:[", remote, "]");
  // (No copy of the token: the post-routing handler wipes the header's values.)
  const auto token = request.headers.find("X-Vault-Token");
  {
    std::lock_guard lock(state.mu);
    if (state.closing) return ReplyError(response, 503, "");
    ++state.in_kms;
    SetInKms(state, true);
  }
  absl::StatusOr<core::Kms::TdeKey> key = state.kms->FetchTdeKey(
      peer, token == request.headers.end() ? std::string_view() : std::string_view(token->second),
      mount, key_id.value_or(0), version, malformed);
  const int status = key.ok() ? 200 : HttpStatusOf(key.status());
  // The reason stays in custosd's log and audit record: a client learns only the status.
  const std::string failure = status >= 500 ? key.status().ToString() : std::string();
  bool log_failure = false;
  {
    std::lock_guard lock(state.mu);
    // Noted before the call counts as out of Kms: once stopping sees none inside, every
    // failure is counted, and its final tally includes them all.
    if (!failure.empty()) log_failure = state.NoteFailure(failure);
    if (key.ok()) ++state.replying;  // (before it leaves Kms: stopping waits for either)
    --state.in_kms;
    SetInKms(state, false);
    state.changed.notify_all();
  }
  if (log_failure) spdlog::warn("gateway: {}", failure);
  if (!key.ok()) {
    return ReplyError(response, status,
                      status == 403 ? "permission denied"
                      : status == 400 && key.status() == malformed
                          ? std::string(malformed.message())
                          : "");  // its own words only
  }
  const auto sent = [&state](bool written) {
    std::lock_guard lock(state.mu);
    KvGateway::State::Connection* connection = state.Served();
    if (written && connection != nullptr) connection->replied = true;
    --state.replying;
    state.changed.notify_all();
  };
  try {
    // The key's hex is written once, into a body sized beforehand (a reallocation would free a
    // copy unwiped), which is wiped when the response is destroyed.
    static constexpr char kHex[] = "0123456789abcdef";
    static constexpr std::string_view kHead = R"({"data":{"data":{"data":")";
    const std::string tail = StrCat(R"("},"metadata":{"version":)", key->version, "}}}");
    std::string body;
    body.reserve(kHead.size() + 2 * key->key.size() + tail.size());
    body.append(kHead);
    for (size_t i = 0; i < key->key.size(); ++i) {
      body.push_back(kHex[key->key.data()[i] >> 4]);
      body.push_back(kHex[key->key.data()[i] & 0x0f]);
    }
    body.append(tail);
    ReplySecret(response, std::move(body), sent);
  } catch (...) {
    sent(false);  // nothing was handed to cpp-httplib (its exception handler answers 500)
    throw;
  }
}

}  // namespace

void WipeTokens(const httplib::Request& request) {
  const auto [begin, end] = request.headers.equal_range("X-Vault-Token");
  for (auto header = begin; header != end; ++header) {
    WipeString(const_cast<std::string&>(header->second));  // cpp-httplib's own object
  }
}

void ReplySecret(httplib::Response& response, std::string body,
                 std::function<void(bool written)> released) {
  auto secret = std::make_shared<std::string>(std::move(body));
  response.status = 200;
  response.set_content_provider(
      secret->size(), "application/json",
      [secret](size_t offset, size_t length, httplib::DataSink& sink) {
        // cpp-httplib does not hold a requested range to the body (the gateway clears them).
        if (offset > secret->size() || length > secret->size() - offset) return false;
        return sink.write(secret->data() + offset, length);
      },
      [secret, released = std::move(released)](bool written) {
        WipeString(*secret);
        if (released) released(written);
      });
}

absl::StatusOr<std::unique_ptr<KvGateway>> KvGateway::Start(core::Kms* kms, const Options& options,
                                                            metrics::Registry* registry) {
  const std::string& listen = options.listen;
  const std::optional<ListenAddress> address = ParseListen(listen);
  if (!address) {
    return absl::InvalidArgumentError(
        StrCat("config: gateway.listen must be host:port, not '", listen, "'"));
  }
  std::string tls_error;
  auto gateway = std::unique_ptr<KvGateway>(new KvGateway());
  gateway->server_ = std::make_unique<httplib::SSLServer>([&](SSL_CTX& ctx) {
    const bool ok = SSL_CTX_set_min_proto_version(&ctx, TLS1_2_VERSION) == 1 &&
                    SSL_CTX_set_cipher_list(&ctx, kTls12Ciphers) == 1 &&
                    SSL_CTX_use_certificate_chain_file(&ctx, options.cert.c_str()) == 1 &&
                    SSL_CTX_use_PrivateKey_file(&ctx, options.key.c_str(), SSL_FILETYPE_PEM) == 1 &&
                    SSL_CTX_check_private_key(&ctx) == 1;
    if (!ok) tls_error = StrCat("cannot set up TLS with ", options.cert, " and ", options.key);
    SSL_CTX_set_options(
        &ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_NO_COMPRESSION |
                  // OpenSSL wipes the records it received (a token, in clear) once read.
                  SSL_OP_CLEANSE_PLAINTEXT);
    SSL_CTX_set_info_callback(&ctx, NoteConnection);
    SSL_CTX_set_msg_callback(&ctx, CountRequestBytes);
    return ok;
  });
  if (!gateway->server_->is_valid()) {
    gateway->server_.reset();  // (the destructor has nothing to stop)
    return absl::InvalidArgumentError(StrCat("gateway: ", tls_error));
  }
  gateway->state_ = std::make_shared<State>(kms);
  gateway->state_->per_address = options.connections_per_address;
  if (registry != nullptr) {
    constexpr const char* kReasons[State::kWhyCount] = {"address_busy", "request_too_long",
                                                        "request_too_slow", "open_too_long",
                                                        "out_of_descriptors"};
    for (int why = 0; why < State::kWhyCount; ++why) {
      gateway->state_->cut_total[why] = &registry->GetCounter(
          "custos_gateway_connections_cut_total",
          "Key/value gateway connections cut before they were done", {{"reason", kReasons[why]}});
    }
  }
  httplib::SSLServer& server = *gateway->server_;
  server.new_task_queue = [state = gateway->state_] { return new BoundedPool(state); };
  server.set_payload_max_length(kMaxPayloadBytes);
  server.set_read_timeout(3, 0);
  server.set_write_timeout(3, 0);
  // One request per connection (the plugin opens a connection per request anyway): the request
  // byte count and the request deadline are per connection, and would not bound a second one.
  server.set_keep_alive_max_count(1);
  // An exception's text would otherwise go out in a header.
  server.set_exception_handler([](const httplib::Request&, httplib::Response& response,
                                  const std::exception_ptr&) { ReplyError(response, 500, ""); });
  const std::string tune = StrCat("/v1/sys/mounts/", kMountPattern, "/tune");
  const std::string fetch = StrCat("/v1/", kMountPattern, "/data/([0-9]{1,10})");
  // Before cpp-httplib reads a body (it would read one sent in chunks, or without a length,
  // whole into memory, token or not) and before it routes: a GET or HEAD of the two routes goes
  // on to them; every other request, whatever its method, path or body, is answered here, its
  // body never read, through the token check (FetchKey), and recorded. (Bounded patterns: an
  // unbounded one would walk every long path through std::regex's recursive matcher.)
  server.set_pre_routing_handler(
      [state = gateway->state_, tune = std::regex(tune), fetch = std::regex(fetch)](
          const httplib::Request& request, httplib::Response& response) {
        // Every answer is sent whole, whatever Range asks: a part of a key's body would be
        // copied, and cpp-httplib does not hold a range to the body's length. (The request is
        // cpp-httplib's own object, not const. A Range it cannot parse is answered 416 before
        // any handler runs. An error handler, if one is ever set, would apply ranges again.)
        const_cast<httplib::Request&>(request).ranges.clear();
        {
          // Its request has all arrived: the request deadline no longer applies.
          std::lock_guard lock(state->mu);
          if (State::Connection* connection = state->Served()) connection->request_read = true;
        }
        if ((request.method == "GET" || request.method == "HEAD") &&
            (std::regex_match(request.path, tune) || std::regex_match(request.path, fetch))) {
          return httplib::Server::HandlerResponse::Unhandled;
        }
        FetchKey(*state, request, response, /*key_fetch=*/false);
        return httplib::Server::HandlerResponse::Handled;
      });
  // Every answer passes here before it is written (a fetch's, the mount check's, and cpp-httplib's
  // own 400 and 416, a cut request's included): the token has served its purpose. (cpp-httplib
  // reads the headers of a request it answers 414, or 500 on a descriptor past FD_SETSIZE, into
  // a map of its own, freed unwiped, as are the buffers and temporaries it parses through.)
  server.set_post_routing_handler(
      [](const httplib::Request& request, httplib::Response&) { WipeTokens(request); });
  server.Get(tune, [](const httplib::Request& request, httplib::Response& response) {
    if (CarriesBody(request)) return ReplyError(response, 400, "a mount check carries no body");
    Reply(response, 200, R"({"data":{"options":{"version":"2"}},"options":{"version":"2"}})");
  });
  server.Get(fetch, [state = gateway->state_](const httplib::Request& request,
                                              httplib::Response& response) {
    FetchKey(*state, request, response, /*key_fetch=*/true);
  });
  gateway->port_ = address->port == 0
                       ? server.bind_to_any_port(address->host)
                       : (server.bind_to_port(address->host, address->port) ? address->port : -1);
  if (gateway->port_ <= 0) {
    gateway->server_.reset();
    return absl::UnavailableError(StrCat("gateway: cannot listen on ", listen));
  }
  auto ended = std::make_shared<std::atomic<bool>>(false);
  gateway->thread_ = std::thread([&server, listen, ended] {
    if (!server.listen_after_bind()) {
      spdlog::error("key/value gateway on {}: accepting connections failed; it serves no more",
                    listen);
    }
    *ended = true;
  });
  // Running before it is returned: stop() does nothing to a server that is not running yet.
  while (!server.is_running() && !*ended) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (*ended) {
    gateway->thread_.join();
    gateway->server_.reset();
    return absl::UnavailableError(StrCat("gateway: cannot serve on ", listen));
  }
  gateway->watchdog_ = std::thread([state = gateway->state_] {
    std::unique_lock lock(state->mu);
    while (
        !state->changed.wait_for(lock, kWatchdogTick, [&] { return state->watchdog_stopping; })) {
      state->TrimAddresses();
      state->CutOverdue();
      if (const std::optional<State::Cuts> cuts = state->TakeCuts(/*now_or_never=*/false)) {
        lock.unlock();
        state->LogCuts(*cuts);
        lock.lock();
      }
      if (auto held = state->TakeHeldFailures(/*now_or_never=*/false); !held.empty()) {
        lock.unlock();
        State::LogHeldFailures(held);
        lock.lock();
      }
    }
  });
  return gateway;
}

KvGateway::~KvGateway() {
  if (!server_) return;
  {
    // Before the accept loop ends, so that the pool waits for the shutting below. No call
    // enters Kms now, and a new connection is shut at its handshake.
    std::unique_lock lock(state_->mu);
    state_->closing = true;
    state_->changed.notify_all();
    // Calls inside Kms end by themselves (the HSM deadline bounds each call). The keys they
    // fetched are sent whole before the listener stops, to a client that reads them within
    // kStopGrace (one that does not is cut).
    state_->changed.wait(lock, [&] { return state_->in_kms == 0; });
    state_->changed.wait_for(lock, kStopGrace, [&] { return state_->replying == 0; });
    state_->listener_stopping = true;
    state_->changed.notify_all();
  }
  server_->stop();  // no new connection
  {
    std::unique_lock lock(state_->mu);
    // (Those still waiting for a thread are shut as their handshake starts: NoteConnection.)
    for (auto& [thread, connection] : state_->connections) {
      if (!connection.replied) State::Shut(connection);
    }
    state_->connections_shut = true;
    state_->changed.notify_all();
    // Threads left to a client must not count into a registry that may be gone.
    std::fill(std::begin(state_->cut_total), std::end(state_->cut_total), nullptr);
  }
  // The accept loop ends once the pool has stopped or given up (kStopGrace); the watchdog
  // keeps its deadlines meanwhile.
  thread_.join();
  {
    std::lock_guard lock(state_->mu);
    state_->watchdog_stopping = true;
    state_->changed.notify_all();
  }
  watchdog_.join();
  std::unique_lock lock(state_->mu);
  if (const std::optional<State::Cuts> cuts = state_->TakeCuts(/*now_or_never=*/true)) {
    lock.unlock();
    state_->LogCuts(*cuts);
    lock.lock();
  }
  if (auto held = state_->TakeHeldFailures(/*now_or_never=*/true); !held.empty()) {
    lock.unlock();
    State::LogHeldFailures(held);
    lock.lock();
  }
  if (state_->busy > 0) {
    // Threads of a client that keeps its connection open still use the server object: it is
    // left to them (never to Kms again) rather than waited for.
    spdlog::warn("key/value gateway: {} connection(s) still open at stop; not waiting for them",
                 state_->busy);
    (void)server_.release();
  }
}

}  // namespace custos::server
